import ArmoryProtocol
import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// The entry point of the Swift client: Armory's `armory.track` API over one connection to armoryd.
///
/// Swift has no keyword arguments, so `trackCall` takes the call's arguments as an ordered list
/// of name–value pairs and the call itself as a closure; the recorded keys are exactly Armory's:
/// `<name>._func` and `<name>.<argument>`.
public final class Tracker: Sendable {
    public let connection: Connection
    private let ids = Atomic<Int64>(1)
    /// Flush warnings already written to stderr (each once).
    private let warned = Mutex<Set<String>>([])

    /// Connects to armoryd (`$ARMORY_SOCKET`, else the per-user socket, else the system one).
    public init(socketPath: String? = nil, program: String = CommandLine.arguments.first ?? "") throws(ArmoryError) {
        connection = try Connection(socketPath: socketPath, program: program)
        ExitFlush.register(connection)
    }

    func nextID() -> Int64 { ids.wrappingAdd(1, ordering: .relaxed).oldValue }

    // MARK: Params

    /// `track_param(key, value)`: records a param in the current context (overwrite wins).
    public func trackParam(_ key: String, _ value: some ParamConvertible) {
        var entries = StringMap()
        for (k, v) in value.paramValue.flattened(key: key) { entries[k] = v }
        guard let checked = checked("param", entries, kind: .param) else { return }
        for (k, v) in checked { connection.send(.trackParam(key: k, value: v)) }
    }

    /// `entries` as MLflow's client logs them, checked before anything is sent (the daemon checks
    /// them again): a value over MLflow's limit is cut to it with a warning on stderr, as MLflow
    /// does (`MLFLOW_TRUNCATE_LONG_VALUES=false`: refused instead). `nil`: a key (or value)
    /// MLflow refuses, recorded and raised at the next sync point, as the daemon's refusals are.
    /// A metric's entries are its keys (values ignored).
    func checked(_ op: String, _ entries: StringMap, kind: MLflowRules.KeyKind) -> StringMap? {
        var out = entries
        for (key, value) in entries {
            do throws(ProtocolError) {
                try MLflowRules.validateKey(key, kind: kind)
                let limit = kind == .param ? MLflowRules.maxParamValueLength : MLflowRules.maxTagValueLength
                guard kind != .metric, value.unicodeScalars.count > limit else { continue }
                guard Self.truncatesLongValues else {
                    try kind == .param ? MLflowRules.validateParamValue(value, key: key) : MLflowRules.validateTagValue(value, key: key)
                    continue
                }
                FileHandle.standardError.write(
                    Data(
                        "ArmoryTrack: warning: \(kind.rawValue) '\(key)' has a value of \(value.unicodeScalars.count) characters: truncated to MLflow's limit of \(limit), as MLflow does. Log the whole value as an artifact (logText); MLFLOW_TRUNCATE_LONG_VALUES=false refuses such values instead.\n"
                            .utf8))
                out[key] = String(String.UnicodeScalarView(value.unicodeScalars.prefix(limit)))
            } catch {
                var refusal = error
                refusal.op = op
                connection.refuse(refusal)
                return nil
            }
        }
        return out
    }

    /// MLflow's own rule (`MLFLOW_TRUNCATE_LONG_VALUES`, default true).
    static let truncatesLongValues = !["false", "0", "no", "off"].contains((ProcessInfo.processInfo.environment["MLFLOW_TRUNCATE_LONG_VALUES"] ?? "true").lowercased())

    /// `track_params` on a call: drops `<prefix>.*` if recorded before, then records
    /// `<prefix>._func` = `function` and `<prefix>.<name>` for each argument not in `ignore`.
    public func trackParams(prefix: String, function: String, _ arguments: KeyValuePairs<String, any ParamConvertible>, ignore: Set<String> = []) {
        var values = StringMap()
        for (name, value) in arguments where !ignore.contains(name) {
            for (k, v) in value.paramValue.flattened(key: name) { values[k] = v }
        }
        var entries: StringMap = [prefix + "._func": function]
        for (k, v) in values { entries[prefix + "." + k] = v }
        guard let checked = checked("params", entries, kind: .param) else { return }
        var sent = StringMap()
        for (k, v) in checked.dropFirst() { sent[String(k.dropFirst(prefix.count + 1))] = v }
        connection.send(.trackParams(prefix: prefix, function: checked[prefix + "._func"] ?? function, values: sent))
    }

    /// `track_call(func, **kwargs)`: records the call's arguments under `name` (or `prefix`) and
    /// runs it. `_func` is `<Module>.<name>`, the module taken from the caller's file.
    @discardableResult
    public func trackCall<Result>(
        _ name: String, prefix: String? = nil, ignore: Set<String> = [], fileID: String = #fileID,
        _ arguments: KeyValuePairs<String, any ParamConvertible>, _ call: () throws -> Result
    ) rethrows -> Result {
        let module = fileID.split(separator: "/").first.map(String.init) ?? "main"
        trackParams(prefix: prefix ?? name, function: module + "." + name, arguments, ignore: ignore)
        return try call()
    }

    /// `track_init_params` / `track_call(Class, …)`: records an initializer's arguments under the
    /// type's name (`_func` = `<Module>.<Type>.init`) and creates the value.
    @discardableResult
    public func trackInit<T>(
        _ type: T.Type, prefix: String? = nil, ignore: Set<String> = [],
        _ arguments: KeyValuePairs<String, any ParamConvertible>, _ make: () throws -> T
    ) rethrows -> T {
        trackParams(prefix: prefix ?? String(describing: type), function: String(reflecting: type) + ".init", arguments, ignore: ignore)
        return try make()
    }

    /// `reset_params()`: clears the current context.
    public func resetParams() { connection.send(.resetParams) }

    /// `get_current_params()`.
    public func currentParams() throws(ArmoryError) -> StringMap {
        try Self.stringMap(connection.request(.getParams)["params"])
    }

    /// `tracking_context(nested:)`: params recorded inside stay inside.
    public func trackingContext<R>(nested: Bool = false, _ body: () throws -> R) rethrows -> R {
        connection.send(.pushContext(nested: nested, trackables: false))
        defer { connection.send(.popContext) }
        return try body()
    }

    /// `trackable_context(nested:)`: trackables created inside get the context's params on exit.
    public func trackableContext<R>(nested: Bool = false, _ body: () throws -> R) rethrows -> R {
        connection.send(.pushContext(nested: nested, trackables: true))
        defer { connection.send(.popContext) }
        return try body()
    }

    /// Makes `value` a `Trackable` (Armory's mixin): it joins the innermost trackable context.
    public func trackable<Value>(_ value: Value) -> Trackable<Value> {
        let id = nextID()
        connection.send(.trackable(id: id))
        return Trackable(id: id, value: value, tracker: self)
    }

    // MARK: Evaluations and runs

    /// An evaluation (an MLflow experiment of that name; its runs are created when it starts).
    public func evaluation(_ name: String, description: String? = nil) -> Evaluation {
        let id = nextID()
        connection.send(.evaluation(id: id, name: name, description: description))
        return Evaluation(id: id, name: name, tracker: self)
    }

    /// Continues an existing run (the seeds' `mlflow.start_run(run_id=…)`): it is RUNNING again until ended.
    public func attach(runID: String) throws(ArmoryError) -> Run {
        try Run(descriptorOf: connection.request(.attach(runID: runID)), tracker: self)
    }

    /// Waits until everything sent so far is durable (or uploaded), then raises earlier errors.
    @discardableResult
    public func flush(_ level: FlushLevel = .durable, timeout: Double = 10) throws(ArmoryError) -> FlushReply {
        let body = try connection.request(.flush(level, timeoutMs: Int64(timeout * 1000)), timeout: timeout + 10)
        guard let reply = FlushReply(json: body) else { throw .protocolViolation("armoryd sent an unreadable flush reply.") }
        for text in reply.warnings where warned.withLock({ $0.insert(text).inserted }) {
            FileHandle.standardError.write(Data("armoryd warning: \(text)\n".utf8))  // the records are safe: the evaluation goes on
        }
        try connection.raiseDeferredErrors()
        return reply
    }

    /// The daemon's status (what `armoryctl status --json` prints).
    public func status() throws(ArmoryError) -> JSONObject {
        try connection.status()
    }

    /// The sync point at the end of a chain or evaluation: durable, or uploaded when
    /// `ARMORY_WAIT_UPLOAD=SECONDS` is set (batch jobs whose disk disappears with them).
    func syncPoint() throws(ArmoryError) {
        if let text = ProcessInfo.processInfo.environment["ARMORY_WAIT_UPLOAD"], let seconds = Double(text), seconds > 0 {
            try flush(.uploaded, timeout: seconds)
        } else {
            try flush(.durable)
        }
    }

    static func stringMap(_ value: JSONValue?) throws(ArmoryError) -> StringMap {
        guard let object = value?.objectValue else { throw .protocolViolation("armoryd sent no params object.") }
        var out = StringMap()
        for (k, v) in object { out[k] = v.stringValue ?? "" }
        return out
    }
}

/// A component whose params are recorded (Armory's `Trackable`): it gets the params of the
/// trackable context it was created in when that context ends.
public struct Trackable<Value>: @unchecked Sendable {
    public let id: Int64
    public let value: Value
    let tracker: Tracker

    /// The params it was given (empty until its trackable context ended).
    public func trackedParams() throws(ArmoryError) -> StringMap {
        try Tracker.stringMap(tracker.connection.request(.getTrackable(id: id))["params"])
    }
}

/// At process exit, every open connection says `bye` and flushes `durable`, bounded (`ARMORY_EXIT_FLUSH_SECONDS`, default 10).
enum ExitFlush {
    private static let connections = Mutex<[ObjectIdentifier: WeakConnection]>([:])
    private static let installed = Atomic<Bool>(false)

    struct WeakConnection: @unchecked Sendable { weak var connection: Connection? }

    static func register(_ connection: Connection) {
        connections.withLock { $0[ObjectIdentifier(connection)] = WeakConnection(connection: connection) }
        if !installed.exchange(true, ordering: .relaxed) {
            atexit { ExitFlush.flushAll() }
        }
    }

    static func flushAll() {
        let seconds = ProcessInfo.processInfo.environment["ARMORY_EXIT_FLUSH_SECONDS"].flatMap(Double.init) ?? 10
        for entry in connections.withLock({ Array($0.values) }) {
            guard let connection = entry.connection else { continue }
            // The process is exiting: once the connection closes, the daemon need not keep its
            // session for a resume. The flush that follows carries `bye` to the daemon.
            connection.send(.bye)
            // Bounded even while the daemon is away: the process is exiting.
            do throws(ArmoryError) {
                _ = try connection.request(.flush(.durable, timeoutMs: Int64(seconds * 1000)), timeout: seconds, waitsOutOutage: false)
            } catch .timedOut(let reason) {
                FileHandle.standardError.write(Data("armoryd: flush at exit: \(reason)\n".utf8))
            } catch {}  // closed already: nothing left to flush
            for error in connection.takeDeferredErrors() {
                FileHandle.standardError.write(Data("armoryd: \(error.description)\n".utf8))
            }
        }
    }
}
