import ArmoryProtocol
import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL
import Synchronization

/// A failed MLflow call, typed by what the caller must do about it.
public enum MLflowError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The server answered with MLflow's error JSON (`error_code`, `message`).
    case api(status: Int, code: String, message: String, retryAfter: Double?)
    /// The server (or a proxy) answered with a body that is not MLflow's error JSON.
    case http(status: Int, body: String, retryAfter: Double?)
    /// No answer: connection refused or reset, timeout, TLS failure.
    case transport(String)
    /// An answer the client cannot use.
    case invalidResponse(String)
    /// A permanent condition found by the client (a deleted experiment, an unsupported artifact store).
    case refused(String)

    /// Worth retrying: connection errors (refused, reset, TLS, timeouts), 408, 429 and every 5xx,
    /// also a proxy's page that is not MLflow's JSON (a 502 from nginx, a 520 from a CDN).
    public var isRetryable: Bool {
        switch self {
        case .transport: true
        case .api(let status, _, _, _), .http(let status, _, _): status == 408 || status == 429 || (500...599).contains(status)
        case .invalidResponse, .refused: false
        }
    }

    /// The server's `Retry-After`, in seconds.
    public var retryAfter: Double? {
        switch self {
        case .api(_, _, _, let r), .http(_, _, let r): r
        default: nil
        }
    }

    public var statusCode: Int? {
        switch self {
        case .api(let s, _, _, _), .http(let s, _, _): s
        default: nil
        }
    }

    public var description: String {
        switch self {
        case .api(let status, let code, let message, _): "MLflow answered \(status) \(code): \(message)"
        case .http(let status, let body, _):
            status == 401 || status == 403
                ? "MLflow answered \(status) (\(body.prefix(200).trimmingCharacters(in: .whitespacesAndNewlines))): check MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN."
                : "MLflow answered \(status): \(body.prefix(300))"
        case .transport(let reason): "MLflow server unreachable: \(reason)"
        case .invalidResponse(let reason): "MLflow sent an unusable answer: \(reason)"
        case .refused(let reason): reason
        }
    }
}

/// What MLflow says about one run.
public struct MLflowRunInfo: Sendable, Equatable {
    public var runID: String
    public var experimentID: String
    public var artifactURI: String
    public var status: RunStatus
    public var name: String
    public var userID: String
    public var endTime: Int64?
    public var params: StringMap = [:]
    public var tags: StringMap = [:]
}

/// MLflow's tracking REST API (2.0) over async-http-client: the calls armoryd's uploader and
/// `armoryctl` need, with MLflow's auth and TLS rules.
public final class MLflowRESTClient: Sendable {
    /// The server as the client was made for (its credentials may have been replaced since).
    public let destination: MLflowDestination
    private let currentCredentials: Mutex<MLflowCredentials>
    private let http: HTTPClient
    private let timeout: TimeAmount

    public init(destination: MLflowDestination, requestTimeoutSeconds: Double = 30) throws(MLflowError) {
        self.destination = destination
        currentCredentials = Mutex(destination.credentials)
        var tls = TLSConfiguration.makeClientConfiguration()
        if destination.tls.insecure { tls.certificateVerification = .none }
        do {
            if let ca = destination.tls.serverCertificatePath {
                tls.trustRoots = .file(ca)
            }
            if let clientPEM = destination.tls.clientCertificatePath {
                tls.certificateChain = try NIOSSLCertificate.fromPEMFile(clientPEM).map { .certificate($0) }
                tls.privateKey = .privateKey(try NIOSSLPrivateKey(file: clientPEM, format: .pem))
            }
        } catch {
            throw .refused("Cannot load the TLS certificate files (\(error)). Check MLFLOW_TRACKING_SERVER_CERT_PATH / MLFLOW_TRACKING_CLIENT_CERT_PATH.")
        }
        var configuration = HTTPClient.Configuration(tlsConfiguration: tls)
        configuration.timeout = .init(connect: .seconds(10), read: .seconds(Int64(requestTimeoutSeconds)))
        configuration.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: 16)
        http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        timeout = .seconds(Int64(requestTimeoutSeconds))
    }

    public func shutdown() async {
        try? await http.shutdown()
    }

    // MARK: Experiments

    /// The experiment of that name, if any (active or deleted).
    public func experiment(named name: String) async throws(MLflowError) -> (id: String, lifecycleStage: String)? {
        do {
            let body = try await call(.GET, "experiments/get-by-name", query: [("experiment_name", name)])
            guard let e = body["experiment"], let id = e["experiment_id"]?.stringValue else {
                throw MLflowError.invalidResponse("get-by-name without experiment_id")
            }
            return (id, e["lifecycle_stage"]?.stringValue ?? "active")
        } catch let error as MLflowError {
            if case .api(_, "RESOURCE_DOES_NOT_EXIST", _, _) = error { return nil }
            throw error
        } catch {
            throw .invalidResponse("\(error)")
        }
    }

    /// Get-or-create by name, safe against another host creating it at the same moment.
    /// The id of the experiment `name`, created first (with `tags`) when there is none.
    public func experimentID(getOrCreate name: String, tags: StringMap? = nil) async throws(MLflowError) -> String {
        if let found = try await experiment(named: name) { return try Self.usable(found, name: name) }
        do {
            var request: JSONObject = ["name": .string(name)]
            if let tags, !tags.isEmpty { request["tags"] = .array(tags.map { .object(["key": .string($0.key), "value": .string($0.value)]) }) }
            let body = try await call(.POST, "experiments/create", json: .object(request))
            guard let id = body["experiment_id"]?.stringValue else { throw MLflowError.invalidResponse("create without experiment_id") }
            return id
        } catch let error as MLflowError {
            guard case .api(_, "RESOURCE_ALREADY_EXISTS", _, _) = error else { throw error }
            guard let found = try await experiment(named: name) else { throw error }
            return try Self.usable(found, name: name)
        } catch {
            throw .invalidResponse("\(error)")
        }
    }

    private static func usable(_ found: (id: String, lifecycleStage: String), name: String) throws(MLflowError) -> String {
        guard found.lifecycleStage == "active" else {
            throw .refused("Experiment '\(name)' (id \(found.id)) is deleted on the MLflow server. Restore it with `mlflow experiments restore --experiment-id \(found.id)` or choose another evaluation name.")
        }
        return found.id
    }

    // MARK: Runs

    public func createRun(experimentID: String, runName: String, startTime: Int64, userID: String, tags: StringMap) async throws(MLflowError) -> MLflowRunInfo {
        let body: JSONValue = .object([
            "experiment_id": .string(experimentID),
            "run_name": .string(runName),
            "start_time": .int(startTime),
            "user_id": .string(userID),
            "tags": .array(tags.map { .object(["key": .string($0.key), "value": .string($0.value)]) }),
        ])
        return try Self.runInfo(try await call(.POST, "runs/create", json: body)["run"])
    }

    /// A run of `experimentID` whose tag `key` is `value` (how an ambiguous create is resolved).
    public func findRun(experimentID: String, tag key: String, value: String) async throws(MLflowError) -> MLflowRunInfo? {
        let escaped = value.replacingOccurrences(of: "'", with: "\\'")
        let body = try await call(
            .POST, "runs/search",
            json: .object([
                "experiment_ids": .array([.string(experimentID)]),
                "filter": .string("tags.`\(key)` = '\(escaped)'"),
                "max_results": .int(2),
            ]))
        guard let first = body["runs"]?.arrayValue?.first else { return nil }
        return try Self.runInfo(first)
    }

    public func getRun(_ runID: String) async throws(MLflowError) -> MLflowRunInfo? {
        do {
            return try Self.runInfo(try await call(.GET, "runs/get", query: [("run_id", runID)])["run"])
        } catch {
            if case .api(_, "RESOURCE_DOES_NOT_EXIST", _, _) = error { return nil }
            throw error
        }
    }

    public func updateRun(_ runID: String, status: RunStatus, endTime: Int64?) async throws(MLflowError) {
        var body: JSONObject = ["run_id": .string(runID), "status": .string(status.rawValue)]
        if let endTime { body["end_time"] = .int(endTime) }
        _ = try await call(.POST, "runs/update", json: .object(body))
    }

    public func deleteTag(_ runID: String, key: String) async throws(MLflowError) {
        _ = try await call(.POST, "runs/delete-tag", json: .object(["run_id": .string(runID), "key": .string(key)]))
    }

    public func setExperimentTag(_ experimentID: String, key: String, value: String) async throws(MLflowError) {
        _ = try await call(
            .POST, "experiments/set-experiment-tag",
            json: .object(["experiment_id": .string(experimentID), "key": .string(key), "value": .string(value)]))
    }

    /// One `runs/log-batch` (the caller keeps it within MLflow's limits).
    public func logBatch(_ runID: String, _ batch: LogBatch) async throws(MLflowError) {
        try await postLogBatch(Self.logBatchBody(runID: runID, batch))
    }

    /// Sends a `runs/log-batch` body built beforehand (`logBatchBody`).
    public func postLogBatch(_ body: [UInt8]) async throws(MLflowError) {
        _ = try await call(.POST, "runs/log-batch", rawJSON: body)
    }

    /// The JSON body of a `runs/log-batch` call; non-finite values as MLflow's strings.
    public static func logBatchBody(runID: String, _ batch: LogBatch) -> [UInt8] {
        var writer = JSONWriter(capacity: 256 + batch.metrics.count * 64)
        writer.append("{\"run_id\":")
        writer.writeString(runID)
        writer.append(",\"metrics\":[")
        for (i, m) in batch.metrics.enumerated() {
            if i > 0 { writer.bytes.append(UInt8(ascii: ",")) }
            writer.append("{\"key\":")
            writer.writeString(m.key)
            writer.append(",\"value\":")
            writer.writeDouble(m.value)
            writer.append(",\"timestamp\":")
            writer.writeInt(m.timestamp)
            writer.append(",\"step\":")
            writer.writeInt(m.step)
            writer.bytes.append(UInt8(ascii: "}"))
        }
        writer.append("],\"params\":")
        writer.write(.array(batch.params.map { .object(["key": .string($0.key), "value": .string($0.value)]) }))
        writer.append(",\"tags\":")
        writer.write(.array(batch.tags.map { .object(["key": .string($0.key), "value": .string($0.value)]) }))
        writer.bytes.append(UInt8(ascii: "}"))
        return writer.bytes
    }

    /// A metric's full history (paged).
    public func metricHistory(_ runID: String, key: String) async throws(MLflowError) -> [MetricPoint] {
        var out: [MetricPoint] = []
        var token: String?
        repeat {
            var query = [("run_id", runID), ("metric_key", key), ("max_results", "25000")]
            if let token { query.append(("page_token", token)) }
            let body = try await call(.GET, "metrics/get-history", query: query)
            for m in body["metrics"]?.arrayValue ?? [] {
                out.append(MetricPoint(key: key, value: m["value"]?.doubleValue ?? .nan, step: m["step"]?.intValue ?? 0, timestamp: m["timestamp"]?.intValue ?? 0))
            }
            token = body["next_page_token"]?.stringValue
        } while token != nil && !(token!.isEmpty)
        return out
    }

    // MARK: Artifacts

    /// Every artifact file of a run (walking directories), with its size in bytes.
    public func listArtifacts(runID: String) async throws(MLflowError) -> [String: Int] {
        var files: [String: Int] = [:]
        var directories = [""]
        while let directory = directories.popLast() {
            var query = [("run_id", runID)]
            if !directory.isEmpty { query.append(("path", directory)) }
            let body = try await call(.GET, "artifacts/list", query: query)
            for entry in body["files"]?.arrayValue ?? [] {
                guard let path = entry["path"]?.stringValue else { continue }
                if entry["is_dir"]?.boolValue == true {
                    directories.append(path)
                } else {
                    files[path] = Int(entry["file_size"]?.intValue ?? 0)
                }
            }
        }
        return files
    }

    /// Uploads a file to `path` under a run's artifact URI: through the server's artifact proxy
    /// (`mlflow-artifacts:` URIs, streamed from disk) or into a `file:` artifact root.
    public func uploadArtifact(artifactURI: String, path: String, file: String) async throws(MLflowError) {
        if artifactURI.hasPrefix("mlflow-artifacts:") {
            var rest = String(artifactURI.dropFirst("mlflow-artifacts:".count))
            if rest.hasPrefix("//") {  // mlflow-artifacts://host:port/path
                rest = String(rest.dropFirst(2))
                rest = rest.firstIndex(of: "/").map { String(rest[$0...]) } ?? "/"
            }
            while rest.hasPrefix("/") { rest.removeFirst() }
            let encoded = (rest + "/" + path).split(separator: "/").map { String($0).addingPercentEncoding(withAllowedCharacters: .urlPathAllowed) ?? String($0) }.joined(separator: "/")
            let url = destination.baseURL + "/api/2.0/mlflow-artifacts/artifacts/" + encoded
            try await put(url: url, file: file)
        } else if artifactURI.hasPrefix("file:") || artifactURI.hasPrefix("/") {
            var root = artifactURI.hasPrefix("file://") ? String(artifactURI.dropFirst(7)) : (artifactURI.hasPrefix("file:") ? String(artifactURI.dropFirst(5)) : artifactURI)
            root = root.removingPercentEncoding ?? root
            let target = root + "/" + path
            do {
                try FileManager.default.createDirectory(atPath: (target as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
                if FileManager.default.fileExists(atPath: target) { try FileManager.default.removeItem(atPath: target) }
                try FileManager.default.copyItem(atPath: file, toPath: target)
            } catch {
                throw .refused("Cannot write artifact into \(target): \(error.localizedDescription). The server hands out a local artifact root; run it with --serve-artifacts (proxied artifacts) or give armoryd access to that path.")
            }
        } else {
            throw .refused("Artifact URI \(artifactURI) is not supported by armoryd: start the MLflow server with --serve-artifacts (the default) so that artifacts go through its proxy.")
        }
    }

    private func put(url: String, file: String) async throws(MLflowError) {
        guard let chunks = FileChunks(path: file) else { throw .refused("Spooled artifact \(file) is missing.") }
        var request = HTTPClientRequest(url: url)
        request.method = .PUT
        request.headers = headers(contentType: "application/octet-stream")
        request.body = .stream(chunks, length: .known(Int64(chunks.size)))
        _ = try await execute(request)
    }

    /// The credentials requests carry now.
    public var credentials: MLflowCredentials { currentCredentials.withLock { $0 } }

    /// Replaces the credentials of later requests (rotated ones); returns whether they changed.
    @discardableResult
    public func useCredentials(_ credentials: MLflowCredentials) -> Bool {
        currentCredentials.withLock { current in
            guard current != credentials else { return false }
            current = credentials
            return true
        }
    }

    // MARK: Transport

    private func headers(contentType: String?) -> HTTPHeaders {
        var h = HTTPHeaders()
        if let contentType { h.add(name: "Content-Type", value: contentType) }
        h.add(name: "User-Agent", value: "armoryd")
        if let auth = credentials.authorization { h.add(name: "Authorization", value: auth) }
        return h
    }

    func call(_ method: HTTPMethod, _ endpoint: String, json: JSONValue? = nil, rawJSON: [UInt8]? = nil, query: [(String, String)] = []) async throws(MLflowError) -> JSONValue {
        var url = destination.baseURL + "/api/2.0/mlflow/" + endpoint
        if !query.isEmpty {
            var allowed = CharacterSet.urlQueryAllowed
            allowed.remove(charactersIn: "&=+?")
            url += "?" + query.map { "\($0.0)=\($0.1.addingPercentEncoding(withAllowedCharacters: allowed) ?? $0.1)" }.joined(separator: "&")
        }
        var request = HTTPClientRequest(url: url)
        request.method = method
        let payload = rawJSON ?? json?.serialized
        request.headers = headers(contentType: payload == nil ? nil : "application/json")
        if let payload { request.body = .bytes(ByteBuffer(bytes: payload)) }
        let body = try await execute(request)
        if body.isEmpty { return .object([:]) }
        do { return try JSONParser.parse(body) } catch {
            throw .invalidResponse("\(endpoint): \(error)")
        }
    }

    /// Sends a request; a non-2xx answer becomes a typed error.
    private func execute(_ request: HTTPClientRequest) async throws(MLflowError) -> [UInt8] {
        let response: HTTPClientResponse
        let bytes: ByteBuffer
        do {
            response = try await http.execute(request, timeout: timeout)
            bytes = try await response.body.collect(upTo: 64 << 20)
        } catch {
            throw .transport(Self.describe(error))
        }
        let body = Array(bytes.readableBytesView)
        guard (200..<300).contains(Int(response.status.code)) else {
            let status = Int(response.status.code)
            let retryAfter = response.headers.first(name: "Retry-After").flatMap(Self.parseRetryAfter)
            if let json = try? JSONParser.parse(body), let code = json["error_code"]?.stringValue {
                throw .api(status: status, code: code, message: json["message"]?.stringValue ?? "", retryAfter: retryAfter)
            }
            throw .http(status: status, body: String(decoding: body.prefix(2000), as: UTF8.self), retryAfter: retryAfter)
        }
        return body
    }

    /// `Retry-After`: seconds, or an HTTP date.
    static func parseRetryAfter(_ value: String) -> Double? {
        if let seconds = Double(value.trimmingCharacters(in: .whitespaces)) { return max(0, seconds) }
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss zzz"
        return formatter.date(from: value).map { max(0, $0.timeIntervalSinceNow) }
    }

    private static func describe(_ error: Error) -> String {
        let text = String(describing: error)
        if text.contains("connectTimeout") { return "connection timed out" }
        if text.contains("readTimeout") || text.contains("deadlineExceeded") { return "no answer within the request timeout" }
        if text.contains("Connection refused") || text.contains("connectionRefused") || text.contains("ECONNREFUSED") { return "connection refused" }
        return text
    }

    static func runInfo(_ run: JSONValue?) throws(MLflowError) -> MLflowRunInfo {
        guard let info = run?["info"], let runID = info["run_id"]?.stringValue else {
            throw .invalidResponse("a run without info.run_id")
        }
        var out = MLflowRunInfo(
            runID: runID, experimentID: info["experiment_id"]?.stringValue ?? "",
            artifactURI: info["artifact_uri"]?.stringValue ?? "", status: RunStatus(rawValue: info["status"]?.stringValue ?? "") ?? .running,
            name: info["run_name"]?.stringValue ?? "", userID: info["user_id"]?.stringValue ?? "",
            endTime: info["end_time"]?.intValue)
        for p in run?["data"]?["params"]?.arrayValue ?? [] {
            if let k = p["key"]?.stringValue { out.params[k] = p["value"]?.stringValue ?? "" }
        }
        for t in run?["data"]?["tags"]?.arrayValue ?? [] {
            if let k = t["key"]?.stringValue { out.tags[k] = t["value"]?.stringValue ?? "" }
        }
        return out
    }
}

/// A file's bytes as a request body: read straight into buffers a megabyte per pull, as the
/// connection takes them, so that a file is never held whole.
struct FileChunks: AsyncSequence, Sendable {
    typealias Element = ByteBuffer

    /// The open file, closed when the last reader lets go of it (also when a request fails mid-way).
    final class Descriptor: Sendable {
        let fd: Int32
        init(_ fd: Int32) { self.fd = fd }
        deinit { close(fd) }
    }

    let path: String
    let size: Int

    init?(path: String) {
        var status = stat()
        guard stat(path, &status) == 0 else { return nil }
        self.path = path
        self.size = Int(status.st_size)
    }

    struct AsyncIterator: AsyncIteratorProtocol {
        let file: Descriptor?

        mutating func next() async throws -> ByteBuffer? {
            guard let file else { throw MLflowError.refused("Cannot open the spooled artifact.") }
            var buffer = ByteBufferAllocator().buffer(capacity: 1 << 20)
            let read = try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 1 << 20) { bytes in
                let n = Glibc.read(file.fd, bytes.baseAddress, bytes.count)
                guard n >= 0 else { throw MLflowError.refused("Reading the spooled artifact failed: \(String(cString: strerror(errno))).") }
                return n
            }
            return read == 0 ? nil : buffer
        }
    }

    func makeAsyncIterator() -> AsyncIterator {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        return AsyncIterator(file: fd < 0 ? nil : Descriptor(fd))
    }
}
