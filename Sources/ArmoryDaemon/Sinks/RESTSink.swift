import ArmoryProtocol
import Foundation
import MLflow
import Synchronization

/// An MLflow tracking server as the sink: batched `log-batch` calls, several in flight, errors
/// sorted into retryable (connection, 408, 429, 5xx) and permanent (other 4xx: dead letters).
public final class RESTSink: RecordSink {
    let client: MLflowRESTClient
    private let experiments = Mutex<[String: String]>([:])
    let artifactURIs = Mutex<[String: String]>([:])
    /// Runs whose records a restart replays, and the points the server already holds per
    /// `run\0key` (read once, on the first replayed batch of that key).
    private let replay = Mutex<(runs: Set<String>, stored: [String: Set<StoredPoint>], since: ContinuousClock.Instant)>(([], [:], .now))
    /// A request the previous daemon had in flight may still be applied by the server after it
    /// died: what the server holds is read no sooner than this after the restart.
    static let replaySettle: Duration = .seconds(2)
    public let concurrency: Int

    /// A metric point as the server stores it (what makes a re-sent one an exact duplicate).
    private struct StoredPoint: Hashable {
        var step: Int64
        var timestamp: Int64
        var value: UInt64
        init(_ m: MetricPoint) {
            step = m.step
            timestamp = m.timestamp
            value = m.value.isNaN ? Double.nan.bitPattern : m.value.bitPattern
        }
    }

    public init(destination: MLflowDestination, concurrency: Int = 4, requestTimeoutSeconds: Double = 30) throws(ProtocolError) {
        do { client = try MLflowRESTClient(destination: destination, requestTimeoutSeconds: requestTimeoutSeconds) } catch {
            throw ProtocolError(.internalError, error.description)
        }
        self.concurrency = max(1, concurrency)
    }

    /// The server and who it writes as now (never a secret).
    public var destination: String { "\(client.destination.baseURL) (\(client.credentials))" }
    public var serverURL: String? { client.destination.baseURL }

    public func useCredentials(_ credentials: MLflowCredentials) -> Bool { client.useCredentials(credentials) }
    public var limits: BatchLimits { .mlflow }
    public var defaultFlushInterval: Double { 1 }
    public var assignsRunIDs: Bool { false }

    public func perform(_ operation: SinkOperation) async -> SinkOutcome {
        do {
            switch operation {
            case .createRun(let c, let parentRunID, let attempt):
                let experimentID: String
                if let given = c.experimentID { experimentID = given } else { experimentID = try await self.experimentID(c.experimentName, createdWith: RunCreation.evaluationExperimentTags) }
                // runs/create is not idempotent: after an ambiguous failure, look for our handle first.
                if attempt > 0, let found = try await client.findRun(experimentID: experimentID, tag: "armory.handle", value: c.handle) {
                    artifactURIs.withLock { $0[found.runID] = found.artifactURI }
                    return .created(runID: found.runID, experimentID: experimentID)
                }
                var tags = c.tags
                if let parentRunID { tags["mlflow.parentRunId"] = parentRunID }
                let run = try await client.createRun(experimentID: experimentID, runName: c.name, startTime: c.startTime, userID: c.userID, tags: tags)
                artifactURIs.withLock { $0[run.runID] = run.artifactURI }
                return .created(runID: run.runID, experimentID: experimentID)
            case .log(let runID, var batch):
                if !batch.metrics.isEmpty, replay.withLock({ $0.runs.contains(runID) }) {
                    batch.metrics = try await unstored(batch.metrics, of: runID)
                    if batch.isEmpty { return .applied }
                }
                try await client.logBatch(runID, batch)
            case .updateRun(let runID, let status, let endTime):
                try await client.updateRun(runID, status: status, endTime: endTime)
                if status.isTerminal { replay.withLock { _ = $0.runs.remove(runID) } }
            case .artifact(let runID, let path, let spoolPath):
                var uri = artifactURIs.withLock { $0[runID] }
                if uri == nil {
                    guard let run = try await client.getRun(runID) else { return .rejected(SinkRefusal(ProtocolError(.notFound, "Run \(runID) no longer exists on \(client.destination.baseURL)."), httpStatus: 404, refusesRun: true)) }
                    uri = run.artifactURI
                    artifactURIs.withLock { $0[runID] = run.artifactURI }
                }
                try await client.uploadArtifact(artifactURI: uri!, path: path, file: spoolPath)
                try? FileManager.default.removeItem(atPath: spoolPath)
            case .deleteTag(let runID, let key):
                try await client.deleteTag(runID, key: key)
            }
            return .applied
        } catch {
            if error.isRetryable { return .retry(after: error.retryAfter, reason: error.description) }
            if let status = error.statusCode, status == 401 || status == 403 {
                return .needsCredentials(reason: "\(client.destination.baseURL) refuses armoryd's credentials (HTTP \(status))")
            }
            return .rejected(Self.refusal(error, of: operation))
        }
    }

    /// A refusal as the dead-letter file records it (the spool file of a refused artifact is
    /// kept for it). A 404, or a message naming the run, refuses the run rather than an entity.
    static func refusal(_ error: MLflowError, of operation: SinkOperation) -> SinkRefusal {
        var refusal = SinkRefusal(translate(error), httpStatus: error.statusCode)
        switch error {
        case .api(let status, let code, let message, _):
            refusal.serverCode = code
            let runID: String? =
                switch operation {
                case .log(let id, _), .updateRun(let id, _, _), .artifact(let id, _, _), .deleteTag(let id, _): id
                case .createRun: nil
                }
            refusal.refusesRun =
                status == 404 || code == "RESOURCE_DOES_NOT_EXIST" || runID.map { message.contains($0) } == true
                || message.contains("must be in the 'active' state")  // a deleted run or experiment
        case .http(let status, let body, _):
            refusal.error.message = "MLflow answered \(status) with a body that is not MLflow's error JSON: \(String(decoding: body.utf8.prefix(200), as: UTF8.self))"
            refusal.refusesRun = status == 404
        default: break
        }
        return refusal
    }

    /// After a restart, the journal's unsettled records may have reached the server before the
    /// daemon stopped (a kill -9 leaves no time to record it): points the server holds are not
    /// sent again, so every point is uploaded exactly once.
    public func replaying(runIDs: Set<String>) {
        replay.withLock {
            $0.runs.formUnion(runIDs)
            $0.since = .now
        }
    }

    private func unstored(_ metrics: [MetricPoint], of runID: String) async throws(MLflowError) -> [MetricPoint] {
        var keys: [String] = []
        for m in metrics where !keys.contains(m.key) { keys.append(m.key) }
        for key in keys where replay.withLock({ $0.stored[runID + "\0" + key] }) == nil {
            try? await EventLoopClock.sleep(until: replay.withLock { $0.since } + Self.replaySettle)
            let history = Set(try await client.metricHistory(runID, key: key).map(StoredPoint.init))
            replay.withLock { $0.stored[runID + "\0" + key] = history }
        }
        return replay.withLock { state in
            metrics.filter { state.stored[runID + "\0" + $0.key]?.contains(StoredPoint($0)) != true }
        }
    }

    /// Runs `work` again after errors worth retrying (connection refused, 429, 5xx), backing off
    /// from 0.5 s to 30 s (or the server's Retry-After), for at most `seconds`.
    static func retrying<Value>(until seconds: Double, _ work: () async throws(MLflowError) -> Value) async throws(MLflowError) -> Value {
        let deadline = Date().addingTimeInterval(seconds)
        var delay = 0.5
        while true {
            do { return try await work() } catch {
                guard error.isRetryable, Date() < deadline else { throw error }
                try? await EventLoopClock.sleep(for: .seconds(min(error.retryAfter ?? delay, 30)))
                delay = min(delay * 2, 30)
            }
        }
    }

    public func findRun(runID: String) async -> StoredRun? {
        guard let run = try? await client.getRun(runID) else { return nil }
        artifactURIs.withLock { $0[run.runID] = run.artifactURI }
        return StoredRun(
            runID: run.runID, experimentID: run.experimentID, name: run.name, userID: run.userID,
            status: run.status, endTime: run.endTime, params: run.params, tags: run.tags)
    }

    public func experiment(named name: String, create: Bool) async throws(ProtocolError) -> String? {
        do {
            if create { return try await experimentID(name) }
            guard let found = try await client.experiment(named: name), found.lifecycleStage == "active" else { return nil }
            return found.id
        } catch {
            throw Self.translate(error)
        }
    }

    public func setExperimentTag(experimentID: String, key: String, value: String) async throws(ProtocolError) {
        do { try await client.setExperimentTag(experimentID, key: key, value: value) } catch { throw Self.translate(error) }
    }

    public func close() async { await client.shutdown() }

    func experimentID(_ name: String, createdWith tags: StringMap? = nil) async throws(MLflowError) -> String {
        if let id = experiments.withLock({ $0[name] }) { return id }
        let id = try await client.experimentID(getOrCreate: name, tags: tags)
        experiments.withLock { $0[name] = id }
        return id
    }

    static func translate(_ error: MLflowError) -> ProtocolError {
        if case .api(_, "INVALID_PARAMETER_VALUE", let message, _) = error, message.contains("Changing param values is not allowed") {
            return ProtocolError(.paramChanged, "MLflow refused a changed param value (params cannot change): \(message)")
        }
        if let status = error.statusCode, status == 401 || status == 403 {
            return ProtocolError(.permissionDenied, error.description)
        }
        return ProtocolError(.sinkRejected, error.description)
    }
}
