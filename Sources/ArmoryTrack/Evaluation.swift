import ArmoryProtocol
import Foundation
import Synchronization

/// Something a chain can use as a component: a `Trackable`, or nothing trackable.
public protocol ChainComponent {
    var trackableID: Int64? { get }
}

extension Trackable: ChainComponent {
    public var trackableID: Int64? { id }
}

/// An Armory evaluation: an MLflow experiment, a parent run with the global params, and one
/// nested run per chain.
public final class Evaluation: @unchecked Sendable {
    public let id: Int64
    public let name: String
    let tracker: Tracker
    private let state = Mutex<(run: Run?, chains: [String: Chain])>((nil, [:]))

    init(id: Int64, name: String, tracker: Tracker) {
        self.id = id
        self.name = name
        self.tracker = tracker
    }

    /// The parent run, once started.
    public var run: Run? { state.withLock { $0.run } }
    /// The chains added so far, by name.
    public var chains: [String: Chain] { state.withLock { $0.chains } }

    /// `evaluation.autotrack()`: a trackable context; its `Tracker` is the `track_call` it yields.
    public func autotrack<R>(_ body: (Tracker) throws -> R) rethrows -> R {
        try tracker.trackableContext { try body(tracker) }
    }

    /// Sets the default component of `role` for chains added afterwards (Armory's `use_*`).
    public func use(_ role: ComponentRole, _ components: [any ChainComponent]) {
        tracker.connection.send(.use(target: id, role: role, ids: components.compactMap(\.trackableID), append: false))
    }
    public func useDataset(_ dataset: any ChainComponent) { use(.dataset, [dataset]) }
    public func usePerturbations(_ perturbations: [any ChainComponent]) { use(.perturbations, perturbations) }
    public func useModel(_ model: any ChainComponent) { use(.model, [model]) }
    public func useMetrics(_ metrics: [any ChainComponent]) { use(.metrics, metrics) }
    public func useExporters(_ exporters: [any ChainComponent]) { use(.exporters, exporters) }

    /// `evaluation.add_chain(name)`: configures a chain inside its own trackable context. Starts nothing.
    @discardableResult
    public func addChain(_ name: String) -> Chain {
        addChain(name) { _ in }
    }

    /// `with evaluation.add_chain(name) as chain:` — `configure` runs inside the chain's context.
    @discardableResult
    public func addChain(_ name: String, _ configure: (Chain) throws -> Void) rethrows -> Chain {
        let chain = try tracker.trackableContext { () throws -> Chain in
            let chain = Chain(id: tracker.nextID(), name: name, evaluation: self)
            tracker.connection.send(.chain(id: chain.id, evaluation: id, name: name))
            try configure(chain)
            return chain
        }
        state.withLock { $0.chains[name] = chain }
        return chain
    }

    /// Starts the parent run (with the global params of this moment); chains start it too.
    @discardableResult
    public func start() throws(ArmoryError) -> Run {
        if let run { return run }
        let run = try Run(descriptorOf: tracker.connection.request(.start(.evaluation(id))), tracker: tracker)
        state.withLock { $0.run = run }
        return run
    }

    /// Ends the parent run and any chain still open with `status`; a durable sync point.
    public func end(_ status: RunStatus = .finished) throws(ArmoryError) {
        _ = try tracker.connection.request(.end(.evaluation(id), status: status, endTime: nil))
        try tracker.syncPoint()
    }

    /// Runs `body` inside the evaluation: FINISHED when it returns, FAILED when it throws.
    public func run<R>(_ body: (Evaluation) throws -> R) throws -> R {
        try start()
        return try finishing(end) { try body(self) }
    }

    /// Waits until everything recorded so far is confirmed by the store (or the bound runs out).
    @discardableResult
    public func waitUploaded(timeout: Double) throws(ArmoryError) -> FlushReply {
        try tracker.flush(.uploaded, timeout: timeout)
    }
}

/// One evaluation chain (a nested run): a dataset, perturbations, a model, metrics, exporters.
public final class Chain: @unchecked Sendable {
    public let id: Int64
    public let name: String
    public let evaluation: Evaluation
    private let started = Mutex<Run?>(nil)

    init(id: Int64, name: String, evaluation: Evaluation) {
        self.id = id
        self.name = name
        self.evaluation = evaluation
    }

    var tracker: Tracker { evaluation.tracker }

    /// The nested run, once started.
    public var run: Run? { started.withLock { $0 } }
    /// MLflow's run id of the nested run, once started (and created on the server).
    public var runID: String? { run?.runID }

    /// `chain.track_call`: records a call's arguments in the chain's context.
    @discardableResult
    public func trackCall<R>(
        _ name: String, prefix: String? = nil, ignore: Set<String> = [], fileID: String = #fileID,
        _ arguments: KeyValuePairs<String, any ParamConvertible>, _ call: () throws -> R
    ) rethrows -> R {
        try tracker.trackCall(name, prefix: prefix, ignore: ignore, fileID: fileID, arguments, call)
    }

    /// Makes `value` a trackable created in this chain's context.
    public func trackable<Value>(_ value: Value) -> Trackable<Value> { tracker.trackable(value) }

    public func use(_ role: ComponentRole, _ components: [any ChainComponent], append: Bool = false) {
        tracker.connection.send(.use(target: id, role: role, ids: components.compactMap(\.trackableID), append: append))
    }
    public func useDataset(_ dataset: any ChainComponent) { use(.dataset, [dataset]) }
    public func usePerturbations(_ perturbations: [any ChainComponent]) { use(.perturbations, perturbations) }
    public func addPerturbation(_ perturbation: any ChainComponent) { use(.perturbations, [perturbation], append: true) }
    public func useModel(_ model: any ChainComponent) { use(.model, [model]) }
    public func useMetrics(_ metrics: [any ChainComponent]) { use(.metrics, metrics) }
    public func addMetric(_ metric: any ChainComponent) { use(.metrics, [metric], append: true) }
    public func useExporters(_ exporters: [any ChainComponent]) { use(.exporters, exporters) }
    public func addExporter(_ exporter: any ChainComponent) { use(.exporters, [exporter], append: true) }

    /// The params the nested run will get (chain, dataset, perturbations, model, metrics, exporters).
    public func trackedParams() throws(ArmoryError) -> StringMap {
        try Tracker.stringMap(tracker.connection.request(.getTrackable(id: id))["params"])
    }

    /// Starts the nested run (and the parent run, if needed) with the chain's merged params.
    @discardableResult
    public func start() throws(ArmoryError) -> Run {
        if let run { return run }
        let run = try Run(descriptorOf: tracker.connection.request(.start(.chain(id))), tracker: tracker)
        started.withLock { $0 = run }
        return run
    }

    /// Ends the nested run; a durable sync point that raises earlier errors.
    public func end(_ status: RunStatus = .finished) throws(ArmoryError) {
        _ = try tracker.connection.request(.end(.chain(id), status: status, endTime: nil))
        try tracker.syncPoint()
    }

    /// Runs `body` in the started chain: FINISHED when it returns, FAILED when it throws.
    public func run<R>(_ body: (Run) throws -> R) throws -> R {
        let run = try start()
        return try finishing(end) { try body(run) }
    }
}

extension Chain {
    /// `chain.track_call(Class, …)`: records an initializer's arguments in the chain's context.
    @discardableResult
    public func trackInit<T>(
        _ type: T.Type, prefix: String? = nil, ignore: Set<String> = [],
        _ arguments: KeyValuePairs<String, any ParamConvertible>, _ make: () throws -> T
    ) rethrows -> T {
        try tracker.trackInit(type, prefix: prefix, ignore: ignore, arguments, make)
    }
}

/// Runs `body`, then ends with FINISHED; if `body` throws, ends with FAILED and rethrows.
func finishing<R>(_ end: (RunStatus) throws(ArmoryError) -> Void, _ body: () throws -> R) throws -> R {
    let result: R
    do { result = try body() } catch {
        try? end(.failed)
        throw error
    }
    try end(.finished)
    return result
}
