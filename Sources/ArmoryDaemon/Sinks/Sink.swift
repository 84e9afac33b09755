import ArmoryProtocol
import Foundation
import MLflow
import Synchronization

/// What the daemon asks the sink to create for a new run.
public struct RunCreation: Sendable, Equatable {
    /// The tags of an experiment the daemon creates for an evaluation: MLflow's UI then opens it
    /// on its runs table (traditional ML, not GenAI), as it does an experiment whose kind was chosen.
    public static let evaluationExperimentTags: StringMap = ["mlflow.experimentKind": "custom_model_development"]

    public var handle: String
    /// Assigned by the daemon when the sink takes daemon ids (the local store); else the server's.
    public var runID: String?
    public var experimentName: String
    /// Set when the client named the experiment by id (MLflow's `create_run`); else by name.
    public var experimentID: String? = nil
    public var name: String
    public var userID: String
    public var startTime: Int64
    /// Tags at creation (`mlflow.parentRunId` is added by the uploader once the parent exists).
    public var tags: StringMap
    public var parentHandle: String?
    /// Who owns the run (the creating connection's uid) and its process, journaled with it.
    public var ownerUID: UInt32 = 0
    public var clientPID: Int32 = 0
}

/// A run the sink already holds (for `attach`).
public struct StoredRun: Sendable, Equatable {
    public var runID: String
    public var experimentID: String
    public var name: String
    public var userID: String
    public var status: RunStatus
    public var endTime: Int64?
    public var params: StringMap
    public var tags: StringMap
}

/// Where records end up: the local MLflow file store or an MLflow server's REST API.
public protocol RecordSink: Sendable {
    /// What status shows (never with credentials).
    var destination: String { get }
    /// Calls in flight at once.
    var concurrency: Int { get }
    var limits: BatchLimits { get }
    /// How long log records wait for a fuller batch by default.
    var defaultFlushInterval: Double { get }
    /// Whether runs are created under daemon-assigned ids (at once) rather than the server's.
    var assignsRunIDs: Bool { get }
    func perform(_ operation: SinkOperation) async -> SinkOutcome
    func findRun(runID: String) async -> StoredRun?
    /// The id of the experiment called `name` (created when `create` and missing); nil when none.
    func experiment(named name: String, create: Bool) async throws(ProtocolError) -> String?
    /// MLflow's `set_experiment_tag`, applied at once (experiments are not journaled).
    func setExperimentTag(experimentID: String, key: String, value: String) async throws(ProtocolError)
    func close() async
    /// Runs whose records are about to be replayed from the journal: some may already be stored.
    func replaying(runIDs: Set<String>)
    /// Makes everything applied so far durable (before the journal records it as settled).
    func persist()
    /// The MLflow server's base URL (nil for a local store): where its credentials are looked up.
    var serverURL: String? { get }
    /// Replaces the credentials of later calls; returns whether they changed (false for a store
    /// that takes none).
    func useCredentials(_ credentials: MLflowCredentials) -> Bool
}

extension RecordSink {
    public func replaying(runIDs: Set<String>) {}
    public func persist() {}
    public var serverURL: String? { nil }
    public func useCredentials(_ credentials: MLflowCredentials) -> Bool { false }

}

/// The embedded default sink: MLflow's file-store layout under `$ARMORY_HOME/mlruns`.
public final class FileStoreSink: RecordSink {
    let store: Mutex<FileStoreBox>
    public let destination: String

    /// `FileStore` is used by one call at a time (concurrency 1), under this lock.
    struct FileStoreBox: @unchecked Sendable {
        let store: FileStore
        var experimentOfRun: [String: String] = [:]
    }

    public init(root: String) throws(ProtocolError) {
        do {
            let store = try FileStore(root: root)
            self.store = Mutex(FileStoreBox(store: store))
            destination = "file://" + store.root
        } catch {
            throw ProtocolError(.internalError, "Cannot open the local store at \(root): \(error)")
        }
    }

    public var concurrency: Int { 1 }
    public var limits: BatchLimits { .localStore }
    public var defaultFlushInterval: Double { 0 }
    public var assignsRunIDs: Bool { true }

    public func perform(_ operation: SinkOperation) async -> SinkOutcome {
        store.withLock { box in
            do {
                switch operation {
                case .createRun(let c, let parentRunID, _):
                    let experimentID = try c.experimentID ?? box.store.experimentID(named: c.experimentName, tags: RunCreation.evaluationExperimentTags)
                    let runID = c.runID ?? RunIDs.newRunID()
                    var tags = c.tags
                    if let parentRunID { tags["mlflow.parentRunId"] = parentRunID }
                    try box.store.createRun(FileStoreRun(runID: runID, experimentID: experimentID, name: c.name, userID: c.userID, status: .running, startTime: c.startTime), tags: tags)
                    box.experimentOfRun[runID] = experimentID
                    return .created(runID: runID, experimentID: experimentID)
                case .log(let runID, let batch):
                    try box.store.logBatch(runID: runID, experimentID: try Self.experiment(of: runID, &box), batch)
                case .updateRun(let runID, let status, let endTime):
                    try box.store.updateRun(runID: runID, experimentID: try Self.experiment(of: runID, &box), status: status, endTime: endTime)
                case .artifact(let runID, let path, let spoolPath):
                    try box.store.storeArtifact(runID: runID, experimentID: try Self.experiment(of: runID, &box), path: path, from: spoolPath)
                case .deleteTag(let runID, let key):
                    try box.store.deleteTag(runID: runID, experimentID: try Self.experiment(of: runID, &box), key: key)
                }
                return .applied
            } catch {
                var refusal = SinkRefusal(Self.translate(error))
                if let error = error as? FileStoreError {
                    switch error {
                    case .runNotFound, .experimentDeleted, .experimentNotFound: refusal.refusesRun = true
                    default: break
                    }
                }
                return .rejected(refusal)
            }
        }
    }

    public func findRun(runID: String) async -> StoredRun? {
        store.withLock { box in
            guard let run = box.store.findRun(runID: runID) else { return nil }
            box.experimentOfRun[runID] = run.experimentID
            return StoredRun(
                runID: run.runID, experimentID: run.experimentID, name: run.name, userID: run.userID,
                status: run.status, endTime: run.endTime, params: box.store.params(of: run), tags: box.store.tags(of: run))
        }
    }

    public func experiment(named name: String, create: Bool) async throws(ProtocolError) -> String? {
        try store.withLock { (box: inout FileStoreBox) throws(ProtocolError) -> String? in
            do { return create ? try box.store.experimentID(named: name) : try box.store.existingExperimentID(named: name) } catch {
                throw Self.translate(error)
            }
        }
    }

    public func setExperimentTag(experimentID: String, key: String, value: String) async throws(ProtocolError) {
        try store.withLock { (box: inout FileStoreBox) throws(ProtocolError) in
            do { try box.store.setExperimentTag(experimentID: experimentID, key: key, value: value) } catch { throw Self.translate(error) }
        }
    }

    public func close() async {}

    public func replaying(runIDs: Set<String>) {
        store.withLock { $0.store.replay(runIDs: runIDs) }
    }

    public func persist() {
        store.withLock { $0.store.persist() }
    }

    private static func experiment(of runID: String, _ box: inout FileStoreBox) throws(FileStoreError) -> String {
        if let id = box.experimentOfRun[runID] { return id }
        guard let run = box.store.findRun(runID: runID) else { throw .runNotFound(runID) }
        box.experimentOfRun[runID] = run.experimentID
        return run.experimentID
    }

    static func translate(_ error: any Error) -> ProtocolError {
        guard let error = error as? FileStoreError else { return ProtocolError(.internalError, "\(error)") }
        return switch error {
        case .paramChanged: ProtocolError(.paramChanged, error.description)
        case .experimentDeleted: ProtocolError(.sinkRejected, error.description)
        case .runNotFound, .experimentNotFound, .tagNotFound: ProtocolError(.notFound, error.description)
        case .invalidPath: ProtocolError(.invalidValue, error.description)
        case .io: ProtocolError(.sinkRejected, "The local store failed: \(error.description)")
        }
    }
}

/// A sink that stores nothing: records are journaled, acked and counted as written, then dropped.
/// It measures the daemon's own cost without a store's (`armoryd --tracking-uri null:`).
public final class NullSink: RecordSink {
    public let destination = "null: (records are journaled, then discarded)"

    public init() {}

    public var concurrency: Int { 1 }
    public var limits: BatchLimits { .localStore }
    public var defaultFlushInterval: Double { 0 }
    public var assignsRunIDs: Bool { true }

    public func perform(_ operation: SinkOperation) async -> SinkOutcome {
        guard case .createRun(let creation, _, _) = operation else { return .applied }
        return .created(runID: creation.runID ?? RunIDs.newRunID(), experimentID: creation.experimentID ?? "0")
    }

    public func findRun(runID: String) async -> StoredRun? { nil }
    public func experiment(named name: String, create: Bool) async throws(ProtocolError) -> String? { "0" }
    public func setExperimentTag(experimentID: String, key: String, value: String) async throws(ProtocolError) {}
    public func close() async {}
}

/// Builds the sink of every destination, the daemon's own and those evaluations name: an MLflow
/// server's REST API, or a local MLflow file store.
public struct SinkFactory: Sendable {
    /// Requests a REST sink keeps in flight.
    public var uploadConcurrency: Int
    /// Seconds one REST request may take.
    public var requestTimeout: Double
    /// The daemon's TLS settings (a client's certificate paths are its own files).
    public var tls: MLflowTLSSettings

    public init(uploadConcurrency: Int = 4, requestTimeout: Double = 30, tls: MLflowTLSSettings = .init()) {
        self.uploadConcurrency = uploadConcurrency
        self.requestTimeout = requestTimeout
        self.tls = tls
    }

    /// The sink of an MLflow server.
    public func server(_ destination: MLflowDestination) throws(ProtocolError) -> any RecordSink {
        try RESTSink(destination: destination, concurrency: uploadConcurrency, requestTimeoutSeconds: requestTimeout)
    }

    /// The sink of a tracking URI: an MLflow server (`http(s)://…`, written to with `credentials`)
    /// or a local store (`file://PATH` or a path).
    public func sink(uri: String, credentials: MLflowCredentials) throws(ProtocolError) -> any RecordSink {
        if MLflowDestination.isRemote(uri) { return try server(MLflowDestination(trackingURI: uri, credentials: credentials, tls: tls)) }
        return try FileStoreSink(root: uri.hasPrefix("file://") ? String(uri.dropFirst("file://".count)) : uri)
    }
}
