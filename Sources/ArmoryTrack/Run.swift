import ArmoryProtocol
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// An MLflow run the daemon writes for this process: a chain's nested run, an evaluation's
/// parent run, or one continued with `Tracker.attach(runID:)`.
///
/// Logging calls are fire-and-forget: they return once the frame is in the send buffer.
public final class Run: Sendable {
    /// The daemon's handle (what log frames name).
    public let handle: String
    /// MLflow's run id (as in `mlflow.start_run(run_id=…)`); `nil` while the server has not
    /// created the run yet (it is unreachable): `resolveRunID(timeout:)` waits for it.
    public let runID: String?
    public let experimentID: String?
    public let name: String
    let tracker: Tracker
    /// `{"op":"log","run":"<handle>","metrics":[[` — the constant head of a one-metric frame.
    private let metricFrameHead: [UInt8]

    init(descriptorOf body: JSONObject, tracker: Tracker) throws(ArmoryError) {
        guard let descriptor = RunDescriptor(json: body) else {
            throw .protocolViolation("armoryd's run reply is not a run (\(body)).")
        }
        handle = descriptor.handle
        self.runID = descriptor.runID
        experimentID = descriptor.experimentID
        name = descriptor.name
        self.tracker = tracker
        var head = JSONWriter(capacity: 64)
        head.append("{\"op\":\"log\",\"run\":")
        head.writeString(descriptor.handle)
        head.append(",\"metrics\":[[")
        metricFrameHead = head.bytes
    }

    /// MLflow's run id, waiting up to `timeout` seconds for the server to create the run.
    public func resolveRunID(timeout: Double = 10) throws(ArmoryError) -> String {
        if let runID { return runID }
        let body = try tracker.connection.request(.runInfo(run: handle, waitMs: Int64(timeout * 1000)), timeout: timeout + 10)
        guard let id = RunDescriptor(json: body)?.runID else {
            throw .timedOut(
                "pending: run '\(name)' (armoryd handle \(handle)) has no MLflow id yet: the MLflow server is unreachable or refuses the credentials (`armoryctl status` says which). Its records are kept and uploaded once the server takes them; `armoryctl status` shows the binding later."
            )
        }
        return id
    }

    /// Logs one metric point. `timestamp` defaults to now (ms); values are fixed at this call.
    public func logMetric(_ key: String, _ value: Double, step: Int64 = 0, timestamp: Int64? = nil) {
        let time = timestamp ?? Self.nowMs()
        if !MLflowRules.isPlainValidKey(key) && tracker.checked("log", [key: ""], kind: .metric) == nil { return }
        tracker.connection.send("log") { writer, seq in
            writer.bytes.append(contentsOf: metricFrameHead)
            writer.writeString(key)
            writer.bytes.append(UInt8(ascii: ","))
            writer.writeDouble(value)
            writer.bytes.append(UInt8(ascii: ","))
            writer.writeInt(step)
            writer.bytes.append(UInt8(ascii: ","))
            writer.writeInt(time)
            writer.append("]],\"seq\":")
            writer.writeInt(seq)
            writer.bytes.append(UInt8(ascii: "}"))
        }
    }

    /// Logs several metrics at one step in one frame.
    public func logMetrics(_ metrics: KeyValuePairs<String, Double>, step: Int64 = 0, timestamp: Int64? = nil) {
        let time = timestamp ?? Self.nowMs()
        log(LogBatch(metrics: metrics.map { MetricPoint(key: $0.key, value: $0.value, step: step, timestamp: time) }))
    }

    /// Logs a batch (metrics, params, tags) in one frame. An entry MLflow would refuse stops the
    /// batch before it is sent; the refusal is raised at the next sync point.
    public func log(_ batch: LogBatch) {
        var keys = StringMap()
        for metric in batch.metrics where !MLflowRules.isPlainValidKey(metric.key) { keys[metric.key] = "" }
        var batch = batch
        guard tracker.checked("log", keys, kind: .metric) != nil,
            let params = tracker.checked("log", batch.params, kind: .param),
            let tags = tracker.checked("log", batch.tags, kind: .tag)
        else { return }
        (batch.params, batch.tags) = (params, tags)
        tracker.connection.send(.log(run: handle, batch: batch))
    }

    public func logParam(_ key: String, _ value: some ParamConvertible) {
        var params = StringMap()
        for (k, v) in value.paramValue.flattened(key: key) { params[k] = v }
        log(LogBatch(params: params))
    }

    public func setTag(_ key: String, _ value: String) {
        log(LogBatch(tags: [key: value]))
    }

    /// Copies a file into the run's artifacts (under `artifactPath`, default its file name).
    /// Streams it in chunks; returns once the daemon holds a copy (the file may then be deleted).
    @discardableResult
    public func logArtifact(_ localPath: String, artifactPath: String? = nil) throws(ArmoryError) -> Int {
        let target = artifactPath ?? (localPath as NSString).lastPathComponent
        guard let file = FileHandle(forReadingAtPath: localPath) else {
            throw .rejected(ProtocolError(.notFound, "Cannot read artifact file \(localPath).", op: "artifact_open"))
        }
        defer { try? file.close() }
        let chunkSize = tracker.connection.helloReply.limits.maxChunkBytes
        return try sendArtifact(path: target, rewind: { try? file.seek(toOffset: 0) }) { () -> [UInt8]? in
            let chunk = file.readData(ofLength: chunkSize)
            return chunk.isEmpty ? nil : Array(chunk)
        }
    }

    /// Writes `text` as the artifact `artifactFile` (MLflow's `log_text`).
    @discardableResult
    public func logText(_ text: String, artifactFile: String) throws(ArmoryError) -> Int {
        try logBytes(Array(text.utf8), artifactFile: artifactFile)
    }

    /// Writes `value` as JSON to `artifactFile` (MLflow's `log_dict`), e.g. `metrics/accuracy.txt`.
    @discardableResult
    public func logJSON(_ value: JSONValue, artifactFile: String) throws(ArmoryError) -> Int {
        try logBytes(value.serialized, artifactFile: artifactFile)
    }

    /// Writes raw bytes as the artifact `artifactFile`.
    @discardableResult
    public func logBytes(_ bytes: [UInt8], artifactFile: String) throws(ArmoryError) -> Int {
        let chunkSize = tracker.connection.helloReply.limits.maxChunkBytes
        var offset = 0
        return try sendArtifact(path: artifactFile, rewind: { offset = 0 }) { () -> [UInt8]? in
            guard offset < bytes.count else { return nil }
            let end = min(bytes.count, offset + chunkSize)
            defer { offset = end }
            return Array(bytes[offset..<end])
        }
    }

    /// Streams an artifact; sent again from its first chunk (after `rewind`) when the daemon
    /// restarted mid-way (`ARTIFACT_INTERRUPTED`: its partial copy did not survive).
    private func sendArtifact(path: String, rewind: () -> Void, nextChunk: () -> [UInt8]?) throws(ArmoryError) -> Int {
        let connection = tracker.connection
        while true {
            guard let artifact = try connection.request(.artifactOpen(run: handle, path: path))["artifact"]?.intValue else {
                throw .protocolViolation("armoryd's artifact_open reply has no artifact id.")
            }
            while let chunk = nextChunk() {
                connection.send(.artifactChunk(artifact: artifact, data: chunk))
            }
            do {
                let reply = try connection.request(.artifactClose(artifact: artifact), timeout: 300)
                return Int(reply["bytes"]?.intValue ?? 0)
            } catch .rejected(let error) where error.code == .artifactInterrupted {
                rewind()
            }
        }
    }

    /// Ends this run (for attached runs; chains and evaluations end through their own `end`).
    public func end(_ status: RunStatus = .finished) throws(ArmoryError) {
        _ = try tracker.connection.request(.end(.run(handle), status: status, endTime: nil))
        try tracker.syncPoint()
    }

    static func nowMs() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
    }
}
