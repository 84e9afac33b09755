import ArmoryProtocol
import MLflow

/// What the daemon asks the sink to create for a new run.
public struct RunCreation: Sendable, Equatable {
    public var runID: String
    public var experimentName: String
    public var name: String
    public var userID: String
    public var startTime: Int64
    public var tags: StringMap
}

/// A run the sink already holds (for `attach`).
public struct StoredRun: Sendable, Equatable {
    public var runID: String
    public var experimentID: String
    public var name: String
    public var userID: String
    public var status: RunStatus
    public var params: StringMap
    public var tags: StringMap
}

/// One ordered unit of work for the sink.
public enum SinkRecord: Sendable {
    case createRun(RunCreation)
    case log(runID: String, batch: LogBatch)
    case updateRun(runID: String, status: RunStatus, endTime: Int64?)
    case artifact(runID: String, path: String, spoolPath: String)

    /// Records counted as metrics, for status.
    var metricCount: Int { if case .log(_, let b) = self { b.metrics.count } else { 0 } }

    /// The run this record belongs to.
    var runID: String? {
        switch self {
        case .createRun(let c): c.runID
        case .log(let runID, _), .updateRun(let runID, _, _), .artifact(let runID, _, _): runID
        }
    }
}

/// Where records end up: the local MLflow file store now, MLflow's REST API later.
///
/// Called from the uploader's thread only, one call at a time.
public protocol RecordSink: AnyObject {
    /// A short description for status (`file:///…/mlruns`).
    var destination: String { get }
    /// Creates the run; returns its experiment id.
    func createRun(_ creation: RunCreation) throws(ProtocolError) -> String
    func log(runID: String, batch: LogBatch) throws(ProtocolError)
    func updateRun(runID: String, status: RunStatus, endTime: Int64?) throws(ProtocolError)
    func storeArtifact(runID: String, path: String, spoolPath: String) throws(ProtocolError)
    func findRun(runID: String) -> StoredRun?
}

/// The embedded default sink: MLflow's file-store layout under `$ARMORY_HOME/mlruns`.
public final class FileStoreSink: RecordSink {
    private let store: FileStore
    private var experimentOfRun: [String: String] = [:]

    public init(root: String) throws(ProtocolError) {
        do { store = try FileStore(root: root) } catch {
            throw ProtocolError(.internalError, "Cannot open the local store at \(root): \(error)")
        }
    }

    public var destination: String { "file://" + store.root }

    public func createRun(_ c: RunCreation) throws(ProtocolError) -> String {
        do {
            let experimentID = try store.experimentID(named: c.experimentName)
            let run = FileStoreRun(runID: c.runID, experimentID: experimentID, name: c.name, userID: c.userID, status: .running, startTime: c.startTime)
            try store.createRun(run, tags: c.tags)
            experimentOfRun[c.runID] = experimentID
            return experimentID
        } catch {
            throw Self.translate(error)
        }
    }

    public func log(runID: String, batch: LogBatch) throws(ProtocolError) {
        let experimentID = try experiment(of: runID)
        do { try store.logBatch(runID: runID, experimentID: experimentID, batch) } catch { throw Self.translate(error) }
    }

    public func updateRun(runID: String, status: RunStatus, endTime: Int64?) throws(ProtocolError) {
        let experimentID = try experiment(of: runID)
        do { try store.updateRun(runID: runID, experimentID: experimentID, status: status, endTime: endTime) } catch { throw Self.translate(error) }
    }

    public func storeArtifact(runID: String, path: String, spoolPath: String) throws(ProtocolError) {
        let experimentID = try experiment(of: runID)
        do { try store.storeArtifact(runID: runID, experimentID: experimentID, path: path, from: spoolPath) } catch { throw Self.translate(error) }
    }

    public func findRun(runID: String) -> StoredRun? {
        guard let run = store.findRun(runID: runID) else { return nil }
        experimentOfRun[runID] = run.experimentID
        return StoredRun(runID: run.runID, experimentID: run.experimentID, name: run.name, userID: run.userID,
                         status: run.status, params: store.params(of: run), tags: store.tags(of: run))
    }

    private func experiment(of runID: String) throws(ProtocolError) -> String {
        if let id = experimentOfRun[runID] { return id }
        if let run = store.findRun(runID: runID) {
            experimentOfRun[runID] = run.experimentID
            return run.experimentID
        }
        throw ProtocolError(.notFound, "Run \(runID) is not in the local store.")
    }

    private static func translate(_ error: FileStoreError) -> ProtocolError {
        switch error {
        case .paramChanged: ProtocolError(.paramChanged, error.description)
        case .experimentDeleted: ProtocolError(.sinkRejected, error.description)
        case .runNotFound: ProtocolError(.notFound, error.description)
        case .invalidPath: ProtocolError(.invalidValue, error.description)
        case .io: ProtocolError(.sinkRejected, "The local store failed: \(error.description)")
        }
    }
}
