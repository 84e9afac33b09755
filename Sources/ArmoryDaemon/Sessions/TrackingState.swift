import ArmoryProtocol

/// One connection's tracking state, exactly as Armory's `armory.track` keeps it per process:
/// a stack of param dicts (the bottom one is the global context), a separate stack of trackable
/// lists, the trackables' recorded params, and the evaluations and chains being configured.
///
/// A plain value type: every rule of docs/architecture.md's "Tracking-context semantics" is tested on it
/// without a socket.
public struct TrackingState: Sendable, Equatable {
    /// What one pushed context was opened as, so `pop` undoes exactly that.
    private enum ContextKind: String, Sendable { case plain, trackable }

    /// An evaluation's defaults for the chains added after them (Armory's `Evaluation.use_*`).
    public struct EvaluationConfig: Sendable, Equatable {
        public var name: String
        public var description: String?
        public var defaults: [ComponentRole: [Int64]] = [:]
    }

    /// A chain's configuration: its components by role (Armory's `Chain`).
    public struct ChainConfig: Sendable, Equatable {
        public var name: String
        public var evaluation: Int64
        public var components: [ComponentRole: [Int64]]
    }

    private(set) var paramStack: [StringMap] = [[:]]
    private var trackableStack: [[Int64]] = [[]]
    private var contextKinds: [ContextKind] = []
    public private(set) var trackedParams: [Int64: StringMap] = [:]
    public private(set) var evaluations: [Int64: EvaluationConfig] = [:]
    public private(set) var chains: [Int64: ChainConfig] = [:]

    public init() {}

    /// The dict `track_param` writes to (`get_current_params()`).
    public var currentParams: StringMap { paramStack[paramStack.count - 1] }
    /// The bottom, global context: what goes to an evaluation's parent run.
    public var globalParams: StringMap { paramStack[0] }
    /// How many contexts are pushed above the global one.
    public var depth: Int { contextKinds.count }

    public mutating func trackParam(key: String, value: String) {
        paramStack[paramStack.count - 1][key] = value
    }

    /// `track_params`/`track_init_params`/`track_call`: drop the prefix's old keys if it was
    /// recorded before, then record `<prefix>._func` and one `<prefix>.<kwarg>` per value.
    public mutating func trackParams(prefix: String, function: String, values: StringMap) {
        let top = paramStack.count - 1
        let dotted = prefix + "."
        if paramStack[top][dotted + "_func"] != nil {
            paramStack[top].removeAll { $0.key.hasPrefix(dotted) }
        }
        paramStack[top][dotted + "_func"] = function
        for (key, value) in values { paramStack[top][dotted + key] = value }
    }

    public mutating func resetParams() {
        paramStack[paramStack.count - 1].removeAll()
    }

    /// `tracking_context(nested:)`, or with `trackables` `trackable_context(nested:)`.
    public mutating func pushContext(nested: Bool, trackables: Bool) {
        paramStack.append(nested ? currentParams : [:])
        if trackables { trackableStack.append([]) }
        contextKinds.append(trackables ? .trackable : .plain)
    }

    /// Leaves the innermost context; a trackable context hands its params to its trackables.
    public mutating func popContext() throws(ProtocolError) {
        guard let kind = contextKinds.popLast() else {
            throw ProtocolError(.invalidState, "pop_context without a matching push_context: only the global context is left.")
        }
        if kind == .trackable {
            let params = currentParams
            for id in trackableStack.removeLast() { trackedParams[id] = params }
        }
        paramStack.removeLast()
    }

    /// A `Trackable` was created: it joins the innermost trackable list with no params yet.
    public mutating func registerTrackable(id: Int64) throws(ProtocolError) {
        try checkUnused(id)
        trackedParams[id] = [:]
        trackableStack[trackableStack.count - 1].append(id)
    }

    /// Evaluations, chains and trackables share one namespace of ids per session.
    private func checkUnused(_ id: Int64) throws(ProtocolError) {
        let holder = chains[id] != nil ? "a chain" : evaluations[id] != nil ? "an evaluation" : trackedParams[id] != nil ? "a trackable" : nil
        if let holder {
            throw ProtocolError(.invalidValue, "Id \(id) is already \(holder)'s on this connection: evaluations, chains and trackables share one namespace of ids, so each needs its own.")
        }
    }

    public func params(ofTrackable id: Int64) throws(ProtocolError) -> StringMap {
        guard let params = trackedParams[id] else {
            throw ProtocolError(.unknownHandle, "No trackable with id \(id) on this connection: send \"trackable\" first.")
        }
        return params
    }

    public mutating func defineEvaluation(id: Int64, name: String, description: String?) throws(ProtocolError) {
        try MLflowRules.validateExperimentName(name)
        try checkUnused(id)
        evaluations[id] = EvaluationConfig(name: name, description: description)
    }

    /// `add_chain(name)`: the chain is itself a trackable, created in the current context,
    /// and starts from the evaluation's defaults of this moment.
    public mutating func defineChain(id: Int64, evaluation: Int64, name: String) throws(ProtocolError) {
        guard let config = evaluations[evaluation] else {
            throw ProtocolError(.unknownHandle, "No evaluation with id \(evaluation) on this connection: send \"evaluation\" first.")
        }
        if name.isEmpty { throw ProtocolError(.invalidValue, "A chain needs a non-empty name.") }
        if let existing = chains.values.first(where: { $0.evaluation == evaluation && $0.name == name }) {
            throw ProtocolError(.invalidValue, "Evaluation '\(config.name)' already has a chain named '\(existing.name)': chain names must be unique within an evaluation.")
        }
        try registerTrackable(id: id)
        chains[id] = ChainConfig(name: name, evaluation: evaluation, components: config.defaults)
    }

    /// `use_*` (replace) or `add_*` (append) on an evaluation (defaults) or a chain.
    public mutating func use(target: Int64, role: ComponentRole, ids: [Int64], append: Bool) throws(ProtocolError) {
        for id in ids where trackedParams[id] == nil {
            throw ProtocolError(.unknownHandle, "No trackable with id \(id) on this connection: send \"trackable\" first.")
        }
        if chains[target] != nil {
            chains[target]!.components[role] = (append ? chains[target]!.components[role] ?? [] : []) + ids
        } else if evaluations[target] != nil {
            evaluations[target]!.defaults[role] = (append ? evaluations[target]!.defaults[role] ?? [] : []) + ids
        } else {
            throw ProtocolError(.unknownHandle, "No evaluation or chain with id \(target) on this connection.")
        }
    }

    /// Armory's `Chain.get_tracked_params()`: the chain's own, then dataset, perturbations,
    /// model, metrics and exporters; later wins.
    public func chainParams(id: Int64) throws(ProtocolError) -> StringMap {
        guard let chain = chains[id] else {
            throw ProtocolError(.unknownHandle, "No chain with id \(id) on this connection: send \"chain\" first.")
        }
        var merged = trackedParams[id] ?? [:]
        for role in ComponentRole.allCases {
            for component in chain.components[role] ?? [] {
                for (key, value) in trackedParams[component] ?? [:] { merged[key] = value }
            }
        }
        return merged
    }

    // MARK: Journal form

    /// The whole state as JSON, for a session's journal record (restored after a restart).
    public var json: JSONValue {
        func ids(_ list: [Int64]) -> JSONValue { .array(list.map { .int($0) }) }
        func roles(_ map: [ComponentRole: [Int64]]) -> JSONValue {
            var o = JSONObject()
            for role in ComponentRole.allCases { if let list = map[role] { o[role.rawValue] = ids(list) } }
            return .object(o)
        }
        func strings(_ map: StringMap) -> JSONValue { .object(map.mapValues { .string($0) }) }
        var tracked = JSONObject()
        for (id, params) in trackedParams.sorted(by: { $0.key < $1.key }) { tracked[String(id)] = strings(params) }
        var evaluationsJSON = JSONObject()
        for (id, e) in evaluations.sorted(by: { $0.key < $1.key }) {
            evaluationsJSON[String(id)] = .object(["name": .string(e.name), "description": e.description.map { .string($0) } ?? .null, "defaults": roles(e.defaults)])
        }
        var chainsJSON = JSONObject()
        for (id, c) in chains.sorted(by: { $0.key < $1.key }) {
            chainsJSON[String(id)] = .object(["name": .string(c.name), "evaluation": .int(c.evaluation), "components": roles(c.components)])
        }
        var o = JSONObject()
        o["params"] = .array(paramStack.map(strings))
        o["trackables"] = .array(trackableStack.map(ids))
        o["kinds"] = .array(contextKinds.map { .string($0.rawValue) })
        o["tracked"] = .object(tracked)
        o["evaluations"] = .object(evaluationsJSON)
        o["chains"] = .object(chainsJSON)
        return .object(o)
    }

    /// Reads what `json` wrote; `nil` when it is not that shape.
    public init?(json: JSONValue) {
        func ids(_ v: JSONValue?) -> [Int64]? { v?.arrayValue.map { $0.compactMap(\.intValue) } }
        func strings(_ v: JSONValue?) -> StringMap? {
            guard let o = v?.objectValue else { return nil }
            var out = StringMap()
            for (key, value) in o { if let text = value.stringValue { out[key] = text } }
            return out
        }
        func roles(_ v: JSONValue?) -> [ComponentRole: [Int64]] {
            var out: [ComponentRole: [Int64]] = [:]
            for (key, value) in v?.objectValue ?? [:] { if let role = ComponentRole(rawValue: key), let list = ids(value) { out[role] = list } }
            return out
        }
        guard let o = json.objectValue, let params = o["params"]?.arrayValue?.compactMap(strings), !params.isEmpty,
            let trackables = o["trackables"]?.arrayValue?.compactMap(ids), !trackables.isEmpty,
            let kinds = o["kinds"]?.arrayValue?.compactMap({ $0.stringValue.flatMap(ContextKind.init(rawValue:)) }),
            params.count == kinds.count + 1
        else { return nil }
        paramStack = params
        trackableStack = trackables
        contextKinds = kinds
        for (key, value) in o["tracked"]?.objectValue ?? [:] { if let id = Int64(key), let map = strings(value) { trackedParams[id] = map } }
        for (key, value) in o["evaluations"]?.objectValue ?? [:] {
            guard let id = Int64(key), let e = value.objectValue, let name = e["name"]?.stringValue else { continue }
            evaluations[id] = EvaluationConfig(name: name, description: e["description"]?.stringValue, defaults: roles(e["defaults"]))
        }
        for (key, value) in o["chains"]?.objectValue ?? [:] {
            guard let id = Int64(key), let c = value.objectValue, let name = c["name"]?.stringValue, let evaluation = c["evaluation"]?.intValue else { continue }
            chains[id] = ChainConfig(name: name, evaluation: evaluation, components: roles(c["components"]))
        }
    }
}
