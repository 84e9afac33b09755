import OrderedCollections

/// One metric point, its values fixed at acceptance (never re-stamped at upload).
public struct MetricPoint: Sendable, Equatable {
    public var key: String
    public var value: Double
    public var step: Int64
    /// Milliseconds since the epoch.
    public var timestamp: Int64

    public init(key: String, value: Double, step: Int64 = 0, timestamp: Int64) {
        self.key = key
        self.value = value
        self.step = step
        self.timestamp = timestamp
    }

    public static func == (a: MetricPoint, b: MetricPoint) -> Bool {
        a.key == b.key && a.step == b.step && a.timestamp == b.timestamp
            && (a.value == b.value || (a.value.isNaN && b.value.isNaN))
    }
}

/// An ordered string-to-string map (params, tags), as a Python dict keeps them.
public typealias StringMap = OrderedDictionary<String, String>

/// Metrics, params and tags for one run, as MLflow's `log-batch` takes them.
public struct LogBatch: Sendable, Equatable {
    public var metrics: [MetricPoint]
    public var params: StringMap
    public var tags: StringMap

    public init(metrics: [MetricPoint] = [], params: StringMap = [:], tags: StringMap = [:]) {
        self.metrics = metrics
        self.params = params
        self.tags = tags
    }

    public var isEmpty: Bool { metrics.isEmpty && params.isEmpty && tags.isEmpty }
}

/// How a run ended (MLflow's terminal run statuses).
public enum RunStatus: String, Sendable, CaseIterable {
    case running = "RUNNING"
    case scheduled = "SCHEDULED"
    case finished = "FINISHED"
    case failed = "FAILED"
    case killed = "KILLED"

    public var isTerminal: Bool { self == .finished || self == .failed || self == .killed }
}

/// The part of an evaluation chain a trackable is used as (Armory's `use_*`/`add_*`).
public enum ComponentRole: String, Sendable, CaseIterable {
    case dataset, perturbations, model, metrics, exporters
}

/// What a `start` or `end` names: an evaluation or chain (by client id) or a run (by handle).
public enum RunTarget: Sendable, Equatable {
    case evaluation(Int64)
    case chain(Int64)
    case run(String)
}

/// How far a `flush` waits.
public enum FlushLevel: String, Sendable {
    /// Every frame sent before the flush is acknowledged.
    case durable
    /// Every record of this connection's runs is confirmed or settled by the sink.
    case uploaded
}

/// The `hello` handshake a client opens every connection with.
public struct Hello: Sendable, Equatable {
    public var protocolVersion: Int
    public var client: String
    public var clientVersion: String
    /// The program's path (recorded as `mlflow.source.name`).
    public var program: String
    /// The process's own `MLFLOW_TRACKING_URI`, if it names one (`armoryd:` means the daemon's).
    public var trackingURI: String?
    /// The process's MLflow credentials, for its own tracking URI (kept in daemon memory only).
    public var credentials: MLflowCredentials
    /// `false`: the daemon logs no `system/...` metrics to this connection's runs.
    public var systemMetrics: Bool = true
    /// Continue a session this client had before its connection broke (or the daemon restarted).
    public var resume: Resume?
    /// An admin tool (`armoryctl`): not listed or counted as a client.
    public var admin: Bool = false

    /// `hello`'s `resume`: the session to continue and the highest `seq` the client saw acked.
    public struct Resume: Sendable, Equatable {
        public var session: String
        public var acked: UInt64

        public init(session: String, acked: UInt64) {
            self.session = session
            self.acked = acked
        }
    }

    public init(
        protocolVersion: Int = ProtocolVersion.current, client: String, clientVersion: String, program: String,
        trackingURI: String? = nil, credentials: MLflowCredentials = MLflowCredentials()
    ) {
        self.protocolVersion = protocolVersion
        self.client = client
        self.clientVersion = clientVersion
        self.program = program
        self.trackingURI = trackingURI
        self.credentials = credentials
    }
}

/// Every operation a client can send. See `proto/PROTOCOL.md`.
public enum ClientOp: Sendable, Equatable {
    case hello(Hello)
    // Tracking contexts (fire-and-forget).
    case trackParam(key: String, value: String)
    case trackParams(prefix: String, function: String, values: StringMap)
    case resetParams
    case pushContext(nested: Bool, trackables: Bool)
    case popContext
    case trackable(id: Int64)
    case evaluation(id: Int64, name: String, description: String?)
    case chain(id: Int64, evaluation: Int64, name: String)
    case use(target: Int64, role: ComponentRole, ids: [Int64], append: Bool)
    // Queries (reply).
    case getParams
    case getTrackable(id: Int64)
    // Runs.
    case start(RunTarget)
    /// `endTime` (ms): the client's own end time (MLflow's `update_run_info`); else the daemon's.
    case end(RunTarget, status: RunStatus, endTime: Int64?)
    /// MLflow's experiment lookup (`create`: get-or-create) for clients speaking MLflow's API.
    case experiment(name: String, create: Bool)
    /// MLflow's `create_run` for clients speaking MLflow's API: a run outside any evaluation.
    case createRun(experimentID: String, runName: String?, startTime: Int64?, tags: StringMap)
    case attach(runID: String)
    /// `waitMs` > 0: wait that long for a pending run to exist in MLflow.
    case runInfo(run: String, waitMs: Int64)
    case log(run: String, batch: LogBatch)
    /// MLflow's `delete_tag`, ordered with the run's other records (fire-and-forget).
    case deleteTag(run: String, key: String)
    /// MLflow's `set_experiment_tag`: applied by the sink before the reply.
    case setExperimentTag(experimentID: String, key: String, value: String)
    // Artifacts.
    case artifactOpen(run: String, path: String)
    case artifactChunk(artifact: Int64, data: [UInt8])
    case artifactClose(artifact: Int64)
    // Control.
    case flush(FlushLevel, timeoutMs: Int64)
    case status
    /// `armoryctl sync`: copy runs of a local store into this connection's destination, in the
    /// background; the reply is the job as it starts.
    case sync(SyncRequest)
    /// The sync jobs of this daemon and their progress.
    case syncStatus
    /// `armoryctl errors`: the records destinations refused for good (of one run when `runID` is
    /// given); with `retry`, they are queued again instead.
    case deadLetters(runID: String?, retry: Bool)
    /// The client is exiting: once this connection closes, its session ends at once instead of
    /// waiting `--orphan-grace` for a resume (fire-and-forget; frames after it are still served).
    case bye

    /// The op's name on the wire.
    public var name: String {
        switch self {
        case .hello: "hello"
        case .trackParam: "param"
        case .trackParams: "params"
        case .resetParams: "reset_params"
        case .pushContext: "push_context"
        case .popContext: "pop_context"
        case .trackable: "trackable"
        case .evaluation: "evaluation"
        case .chain: "chain"
        case .use: "use"
        case .getParams: "get_params"
        case .getTrackable: "get_trackable"
        case .start: "start"
        case .end: "end"
        case .experiment: "experiment"
        case .createRun: "create_run"
        case .attach: "attach"
        case .runInfo: "run_info"
        case .log: "log"
        case .deleteTag: "delete_tag"
        case .setExperimentTag: "set_experiment_tag"
        case .artifactOpen: "artifact_open"
        case .artifactChunk: "artifact_chunk"
        case .artifactClose: "artifact_close"
        case .flush: "flush"
        case .status: "status"
        case .sync: "sync"
        case .syncStatus: "sync_status"
        case .deadLetters: "dead_letters"
        case .bye: "bye"
        }
    }

    /// The names of the ops the daemon answers with a reply (`expectsReply`). An error naming one
    /// of them as `failed_op`, with a `seq` the client no longer waits for, answers a request
    /// the client re-sent after a resume and already had its answer to: it is not a new refusal.
    public static let requestNames: Set<String> = [
        "hello", "get_params", "get_trackable", "start", "end", "attach", "run_info", "artifact_open", "artifact_close",
        "flush", "status", "experiment", "create_run", "set_experiment_tag", "sync", "sync_status", "dead_letters",
    ]

    /// Whether the daemon answers this op with a reply (else it is fire-and-forget).
    public var expectsReply: Bool {
        switch self {
        case .hello, .getParams, .getTrackable, .start, .end, .attach, .runInfo, .artifactOpen, .artifactClose, .flush, .status, .experiment, .createRun,
            .setExperimentTag, .sync, .syncStatus, .deadLetters:
            true
        case .trackParam, .trackParams, .resetParams, .pushContext, .popContext, .trackable, .evaluation, .chain, .use, .log, .artifactChunk, .deleteTag, .bye:
            false
        }
    }
}

/// What `sync` copies: runs of the store at `from` (default: the daemon's own local store),
/// limited to the named experiments and runs when given; `dryRun` plans without sending.
public struct SyncRequest: Sendable, Equatable {
    public var from: String?
    public var experiments: [String]
    public var runs: [String]
    public var dryRun: Bool

    public init(from: String? = nil, experiments: [String] = [], runs: [String] = [], dryRun: Bool = false) {
        self.from = from
        self.experiments = experiments
        self.runs = runs
        self.dryRun = dryRun
    }
}

/// One client frame: a sequence number and an op.
public struct ClientFrame: Sendable, Equatable {
    public var seq: UInt64
    public var op: ClientOp

    public init(seq: UInt64, op: ClientOp) {
        self.seq = seq
        self.op = op
    }
}

extension ProtocolError {
    /// This error as the answer to `frame`: its `seq` and op, unless the error names them already.
    public func answering(_ frame: ClientFrame) -> ProtocolError {
        var error = self
        error.seq = seq ?? frame.seq
        error.op = op ?? frame.op.name
        return error
    }
}

// MARK: - Decoding

extension ClientFrame {
    /// Decodes a frame payload. `receivedAtMs` stamps metrics that carry no timestamp.
    public static func decode(payload: [UInt8], receivedAtMs: Int64, maxDepth: Int = ProtocolLimits.default.maxDepth) throws(ProtocolError) -> ClientFrame {
        if let frame = payload.withUnsafeBytes({ LogFrameDecoder.decode($0) }) { return frame }
        let json: JSONValue
        do {
            json = try JSONParser.parse(payload, maxDepth: maxDepth)
        } catch {
            let (op, seq) = FramePeek.opAndSeq(payload)
            throw ProtocolError(.badJSON, "The frame is not valid JSON (\(error)). Send one UTF-8 JSON object per frame.", seq: seq, op: op)
        }
        return try decode(json: json, receivedAtMs: receivedAtMs)
    }

    /// Decodes a parsed frame; an error names the frame's `seq` and `op` as far as they can be read.
    public static func decode(json: JSONValue, receivedAtMs: Int64) throws(ProtocolError) -> ClientFrame {
        do {
            return try decodeObject(json, receivedAtMs: receivedAtMs)
        } catch var error {
            if case .object(let object) = json {
                if error.seq == nil, let seq = object["seq"]?.intValue, seq >= 1 { error.seq = UInt64(seq) }
                error.op = error.op ?? object["op"]?.stringValue
            }
            throw error
        }
    }

    private static func decodeObject(_ json: JSONValue, receivedAtMs: Int64) throws(ProtocolError) -> ClientFrame {
        guard case .object(let object) = json else {
            throw ProtocolError(.badFrame, "A frame must be a JSON object with \"op\" and \"seq\".")
        }
        let fields = Fields(object: object, seq: nil)
        guard let seqValue = object["seq"]?.intValue, seqValue >= 1 else {
            throw ProtocolError(.badFrame, "The frame has no valid \"seq\" (an integer ≥ 1, rising by 1 on each connection).")
        }
        let seq = UInt64(seqValue)
        var f = fields
        f.seq = seq
        guard let opName = object["op"]?.stringValue else {
            throw ProtocolError(.badFrame, "The frame has no \"op\" string.", seq: seq)
        }
        let op: ClientOp
        switch opName {
        case "hello":
            var hello = Hello(
                protocolVersion: Int(try f.int("protocol")),
                client: try f.optionalString("client") ?? "unknown",
                clientVersion: try f.optionalString("client_version") ?? "",
                program: try f.optionalString("program") ?? "",
                trackingURI: try f.optionalString("tracking_uri"),
                credentials: MLflowCredentials(json: object["credentials"]))
            hello.systemMetrics = try f.optionalBool("system_metrics") ?? true
            hello.resume = try Self.resume(object["resume"], seq: seq)
            hello.admin = try f.optionalBool("admin") ?? false
            op = .hello(hello)
        case "param":
            op = .trackParam(key: try f.string("key"), value: try f.string("value"))
        case "params":
            op = .trackParams(prefix: try f.string("prefix"), function: try f.string("func"), values: try f.stringMap("values"))
        case "reset_params": op = .resetParams
        case "push_context":
            op = .pushContext(nested: try f.optionalBool("nested") ?? false, trackables: try f.optionalBool("trackables") ?? false)
        case "pop_context": op = .popContext
        case "trackable": op = .trackable(id: try f.int("id"))
        case "evaluation":
            op = .evaluation(id: try f.int("id"), name: try f.string("name"), description: try f.optionalString("description"))
        case "chain":
            op = .chain(id: try f.int("id"), evaluation: try f.int("evaluation"), name: try f.string("name"))
        case "use":
            let roleName = try f.string("role")
            guard let role = ComponentRole(rawValue: roleName) else {
                throw ProtocolError(.invalidValue, "Unknown role '\(roleName)': use one of \(ComponentRole.allCases.map(\.rawValue).joined(separator: ", ")).", seq: seq)
            }
            op = .use(target: try f.int("target"), role: role, ids: try f.intArray("ids"), append: try f.optionalBool("append") ?? false)
        case "get_params": op = .getParams
        case "get_trackable": op = .getTrackable(id: try f.int("id"))
        case "start": op = .start(try f.runTarget())
        case "end":
            let statusName = try f.optionalString("status") ?? "FINISHED"
            guard let status = RunStatus(rawValue: statusName), status.isTerminal else {
                throw ProtocolError(.invalidValue, "Unknown end status '\(statusName)': use FINISHED, FAILED or KILLED.", seq: seq)
            }
            op = .end(try f.runTarget(), status: status, endTime: try f.optionalInt("end_time"))
        case "experiment":
            op = .experiment(name: try f.string("name"), create: try f.optionalBool("create") ?? false)
        case "create_run":
            op = .createRun(
                experimentID: try f.string("experiment_id"), runName: try f.optionalString("run_name"),
                startTime: try f.optionalInt("start_time"), tags: try f.stringMap("tags"))
        case "attach": op = .attach(runID: try f.string("run_id"))
        case "run_info": op = .runInfo(run: try f.string("run"), waitMs: max(0, try f.optionalInt("wait_ms") ?? 0))
        case "log":
            op = .log(run: try f.string("run"), batch: try f.logBatch(receivedAtMs: receivedAtMs))
        case "delete_tag": op = .deleteTag(run: try f.string("run"), key: try f.string("key"))
        case "set_experiment_tag":
            op = .setExperimentTag(experimentID: try f.string("experiment_id"), key: try f.string("key"), value: try f.string("value"))
        case "artifact_open": op = .artifactOpen(run: try f.string("run"), path: try f.string("path"))
        case "artifact_chunk":
            let text = try f.string("data")
            guard let data = Base64.decode(text) else {
                throw ProtocolError(.invalidValue, "\"data\" of artifact_chunk is not valid base64.", seq: seq)
            }
            op = .artifactChunk(artifact: try f.int("artifact"), data: data)
        case "artifact_close": op = .artifactClose(artifact: try f.int("artifact"))
        case "flush":
            let levelName = try f.optionalString("wait") ?? "durable"
            guard let level = FlushLevel(rawValue: levelName) else {
                throw ProtocolError(.invalidValue, "Unknown flush level '\(levelName)': use \"durable\" or \"uploaded\".", seq: seq)
            }
            op = .flush(level, timeoutMs: try f.optionalInt("timeout_ms") ?? 10_000)
        case "status": op = .status
        case "sync":
            op = .sync(
                SyncRequest(
                    from: try f.optionalString("from"), experiments: try f.stringArray("experiments"), runs: try f.stringArray("runs"),
                    dryRun: try f.optionalBool("dry_run") ?? false))
        case "sync_status": op = .syncStatus
        case "bye": op = .bye
        case "dead_letters": op = .deadLetters(runID: try f.optionalString("run_id"), retry: try f.optionalBool("retry") ?? false)
        default:
            throw ProtocolError(.unknownOp, "Unknown op '\(opName)'. This daemon speaks protocol \(ProtocolVersion.supported); see proto/PROTOCOL.md for the ops it knows.", seq: seq)
        }
        return ClientFrame(seq: seq, op: op)
    }

    /// Typed access to a frame's members, with errors that name the member and the op.
    /// `hello`'s `resume` member: `{"session": <32 hex digits>, "acked": <seq ≥ 0>}`, or absent.
    static func resume(_ value: JSONValue?, seq: UInt64) throws(ProtocolError) -> Hello.Resume? {
        guard let value, !value.isNull else { return nil }
        guard let o = value.objectValue, let session = o["session"]?.stringValue, Self.isSessionID(session) else {
            throw ProtocolError(.badRequest, "\"resume\" must be {\"session\": <the 32 hex digits hello's reply named>, \"acked\": <the highest seq acked>}; send hello without \"resume\" to open a new session.", seq: seq, op: "hello")
        }
        let acked = o["acked"]?.intValue ?? 0
        guard acked >= 0 else {
            throw ProtocolError(.badRequest, "\"resume.acked\" must be the highest seq the daemon acknowledged (0 or more).", seq: seq, op: "hello")
        }
        return Hello.Resume(session: session, acked: UInt64(acked))
    }

    /// A session id as the daemon hands them out: 32 lowercase hex digits (128 random bits).
    public static func isSessionID(_ s: String) -> Bool {
        s.utf8.count == 32 && s.utf8.allSatisfy { (48...57).contains($0) || (97...102).contains($0) }
    }

    private struct Fields {
        let object: JSONObject
        var seq: UInt64?

        func missing(_ key: String, _ what: String) -> ProtocolError {
            ProtocolError(.badFrame, "\"\(key)\" must be \(what) in op '\(object["op"]?.stringValue ?? "?")'.", seq: seq)
        }

        func string(_ key: String) throws(ProtocolError) -> String {
            guard let s = object[key]?.stringValue else { throw missing(key, "a string") }
            return s
        }

        func optionalString(_ key: String) throws(ProtocolError) -> String? {
            guard let v = object[key], !v.isNull else { return nil }
            guard let s = v.stringValue else { throw missing(key, "a string") }
            return s
        }

        func int(_ key: String) throws(ProtocolError) -> Int64 {
            guard let i = object[key]?.intValue else { throw missing(key, "an integer") }
            return i
        }

        func optionalInt(_ key: String) throws(ProtocolError) -> Int64? {
            guard let v = object[key], !v.isNull else { return nil }
            guard let i = v.intValue else { throw missing(key, "an integer") }
            return i
        }

        func optionalBool(_ key: String) throws(ProtocolError) -> Bool? {
            guard let v = object[key], !v.isNull else { return nil }
            guard let b = v.boolValue else { throw missing(key, "true or false") }
            return b
        }

        func intArray(_ key: String) throws(ProtocolError) -> [Int64] {
            guard let array = object[key]?.arrayValue else { throw missing(key, "an array of integers") }
            var out: [Int64] = []
            for element in array {
                guard let i = element.intValue else { throw missing(key, "an array of integers") }
                out.append(i)
            }
            return out
        }

        /// An optional array of strings (absent: empty).
        func stringArray(_ key: String) throws(ProtocolError) -> [String] {
            guard let v = object[key], !v.isNull else { return [] }
            guard let array = v.arrayValue else { throw missing(key, "an array of strings") }
            var out: [String] = []
            for element in array {
                guard let text = element.stringValue else { throw missing(key, "an array of strings") }
                out.append(text)
            }
            return out
        }

        func stringMap(_ key: String) throws(ProtocolError) -> StringMap {
            guard let v = object[key], !v.isNull else { return [:] }
            guard let members = v.objectValue else { throw missing(key, "an object of strings") }
            var out = StringMap()
            for (k, value) in members {
                guard let s = value.stringValue else {
                    throw ProtocolError(.invalidValue, "Value of '\(k)' in \"\(key)\" must be a string: clients stringify values (Python str()) before sending.", seq: seq)
                }
                out[k] = s
            }
            return out
        }

        func runTarget() throws(ProtocolError) -> RunTarget {
            if let id = try optionalInt("chain") { return .chain(id) }
            if let id = try optionalInt("evaluation") { return .evaluation(id) }
            if let handle = try optionalString("run") { return .run(handle) }
            throw ProtocolError(.badFrame, "Name what to act on: \"evaluation\" (id), \"chain\" (id) or \"run\" (handle).", seq: seq)
        }

        func logBatch(receivedAtMs: Int64) throws(ProtocolError) -> LogBatch {
            var batch = LogBatch(params: try stringMap("params"), tags: try stringMap("tags"))
            if let v = object["metrics"], !v.isNull {
                guard let rows = v.arrayValue else { throw missing("metrics", "an array of [key, value, step, timestamp]") }
                batch.metrics.reserveCapacity(rows.count)
                for row in rows {
                    guard let cells = row.arrayValue, cells.count >= 2, cells.count <= 4, let key = cells[0].stringValue else {
                        throw missing("metrics", "an array of [key, value, step, timestamp]")
                    }
                    guard let value = cells[1].doubleValue else {
                        throw ProtocolError(.invalidValue, "Metric '\(key)' has a value that is not a number (send numbers, or \"NaN\", \"Infinity\", \"-Infinity\").", seq: seq, key: key)
                    }
                    var step: Int64 = 0
                    var timestamp = receivedAtMs
                    if cells.count > 2, !cells[2].isNull {
                        guard let s = cells[2].intValue else {
                            throw ProtocolError(.invalidValue, "Metric '\(key)' has a step that is not an integer.", seq: seq, key: key)
                        }
                        step = s
                    }
                    if cells.count > 3, !cells[3].isNull {
                        guard let t = cells[3].intValue else {
                            throw ProtocolError(.invalidValue, "Metric '\(key)' has a timestamp that is not an integer (milliseconds since the epoch).", seq: seq, key: key)
                        }
                        timestamp = t
                    }
                    batch.metrics.append(MetricPoint(key: key, value: value, step: step, timestamp: timestamp))
                }
            }
            return batch
        }
    }
}

// MARK: - Encoding

extension ClientFrame {
    /// The frame's JSON object.
    public var json: JSONValue {
        var o: JSONObject = ["op": .string(op.name)]
        switch op {
        case .hello(let h):
            o["protocol"] = .int(Int64(h.protocolVersion))
            o["client"] = .string(h.client)
            o["client_version"] = .string(h.clientVersion)
            o["program"] = .string(h.program)
            if let uri = h.trackingURI { o["tracking_uri"] = .string(uri) }
            if let credentials = h.credentials.json { o["credentials"] = credentials }
            if !h.systemMetrics { o["system_metrics"] = .bool(false) }
            if h.admin { o["admin"] = .bool(true) }
            if let r = h.resume { o["resume"] = .object(["session": .string(r.session), "acked": .int(Int64(r.acked))]) }
        case .trackParam(let key, let value):
            o["key"] = .string(key)
            o["value"] = .string(value)
        case .trackParams(let prefix, let function, let values):
            o["prefix"] = .string(prefix)
            o["func"] = .string(function)
            o["values"] = .object(values.mapValues { .string($0) })
        case .resetParams, .popContext, .getParams, .status, .syncStatus, .bye:
            break
        case .deadLetters(let runID, let retry):
            if let runID { o["run_id"] = .string(runID) }
            if retry { o["retry"] = .bool(true) }
        case .sync(let request):
            if let from = request.from { o["from"] = .string(from) }
            if !request.experiments.isEmpty { o["experiments"] = .array(request.experiments.map { .string($0) }) }
            if !request.runs.isEmpty { o["runs"] = .array(request.runs.map { .string($0) }) }
            if request.dryRun { o["dry_run"] = .bool(true) }
        case .pushContext(let nested, let trackables):
            o["nested"] = .bool(nested)
            o["trackables"] = .bool(trackables)
        case .trackable(let id), .getTrackable(let id):
            o["id"] = .int(id)
        case .evaluation(let id, let name, let description):
            o["id"] = .int(id)
            o["name"] = .string(name)
            if let description { o["description"] = .string(description) }
        case .chain(let id, let evaluation, let name):
            o["id"] = .int(id)
            o["evaluation"] = .int(evaluation)
            o["name"] = .string(name)
        case .use(let target, let role, let ids, let append):
            o["target"] = .int(target)
            o["role"] = .string(role.rawValue)
            o["ids"] = .array(ids.map { .int($0) })
            if append { o["append"] = .bool(true) }
        case .start(let target):
            target.write(into: &o)
        case .end(let target, let status, let endTime):
            target.write(into: &o)
            o["status"] = .string(status.rawValue)
            if let endTime { o["end_time"] = .int(endTime) }
        case .experiment(let name, let create):
            o["name"] = .string(name)
            if create { o["create"] = .bool(true) }
        case .createRun(let experimentID, let runName, let startTime, let tags):
            o["experiment_id"] = .string(experimentID)
            if let runName { o["run_name"] = .string(runName) }
            if let startTime { o["start_time"] = .int(startTime) }
            if !tags.isEmpty { o["tags"] = .object(tags.mapValues { .string($0) }) }
        case .attach(let runID):
            o["run_id"] = .string(runID)
        case .runInfo(let run, let waitMs):
            o["run"] = .string(run)
            if waitMs > 0 { o["wait_ms"] = .int(waitMs) }
        case .log(let run, let batch):
            o["run"] = .string(run)
            if !batch.metrics.isEmpty {
                o["metrics"] = .array(batch.metrics.map { .array([.string($0.key), .double($0.value), .int($0.step), .int($0.timestamp)]) })
            }
            if !batch.params.isEmpty { o["params"] = .object(batch.params.mapValues { .string($0) }) }
            if !batch.tags.isEmpty { o["tags"] = .object(batch.tags.mapValues { .string($0) }) }
        case .deleteTag(let run, let key):
            o["run"] = .string(run)
            o["key"] = .string(key)
        case .setExperimentTag(let experimentID, let key, let value):
            o["experiment_id"] = .string(experimentID)
            o["key"] = .string(key)
            o["value"] = .string(value)
        case .artifactOpen(let run, let path):
            o["run"] = .string(run)
            o["path"] = .string(path)
        case .artifactChunk(let artifact, let data):
            o["artifact"] = .int(artifact)
            o["data"] = .string(Base64.encode(data))
        case .artifactClose(let artifact):
            o["artifact"] = .int(artifact)
        case .flush(let level, let timeoutMs):
            o["wait"] = .string(level.rawValue)
            o["timeout_ms"] = .int(timeoutMs)
        }
        // `seq` last: a metrics-only `log` frame then has the exact form `LogFrameDecoder` reads.
        o["seq"] = .int(Int64(seq))
        return .object(o)
    }

    /// The complete frame: length prefix and JSON payload.
    public var encoded: [UInt8] { Frame.encode(json.serialized) }
}

extension RunTarget {
    func write(into o: inout JSONObject) {
        switch self {
        case .evaluation(let id): o["evaluation"] = .int(id)
        case .chain(let id): o["chain"] = .int(id)
        case .run(let handle): o["run"] = .string(handle)
        }
    }
}
