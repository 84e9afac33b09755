import ArmoryProtocol

/// What a session's journal record holds: everything needed to continue it after a restart
/// (docs/architecture.md, "Sessions outlive connections"). Never credentials: a resuming client
/// presents them again in its `hello`.
public struct SessionRecord: Sendable, Equatable {
    /// The form written by this build; a newer form is refused (the session is not restored).
    public static let version: Int64 = 1

    /// A reply a request got, kept so that a re-sent request is answered as the first time.
    public enum CachedReply: Sendable, Equatable {
        case reply(JSONObject)
        /// The descriptor of this run, once it exists (a `start` or `create_run`).
        case run(handle: String)
        /// The request was refused (an error is an answer too: a re-sent request gets it again).
        case error(ProtocolError)
    }

    public var id: String
    public var uid: UInt32
    public var gid: UInt32
    public var pid: Int32
    public var client: String
    public var program: String
    public var systemMetrics: Bool
    /// The highest `seq` whose effects are journaled with this record.
    public var seq: UInt64
    public var tracking: TrackingState
    public var evaluationRuns: [Int64: String]
    public var chainRuns: [Int64: String]
    /// Other runs the session writes (MLflow's `create_run`, `attach`).
    public var otherRuns: [String]
    public var replies: [UInt64: CachedReply]
    /// Artifacts open when the record was written: after a restart they must be sent again.
    public var openArtifacts: [Int64]
    public var nextArtifactID: Int64

    /// The record as versioned JSON (the journal's body for it).
    public var json: JSONValue {
        func idMap(_ m: [Int64: String]) -> JSONValue {
            var o = JSONObject()
            for (id, handle) in m.sorted(by: { $0.key < $1.key }) { o[String(id)] = .string(handle) }
            return .object(o)
        }
        var cached = JSONObject()
        for (seq, reply) in replies.sorted(by: { $0.key < $1.key }) {
            switch reply {
            case .reply(let body): cached[String(seq)] = .object(["reply": .object(body)])
            case .run(let handle): cached[String(seq)] = .object(["run": .string(handle)])
            case .error(let error): cached[String(seq)] = .object(["error": .object(["code": .string(error.code.rawValue), "message": .string(error.message)])])
            }
        }
        var o = JSONObject()
        o["v"] = .int(Self.version)
        o["id"] = .string(id)
        o["uid"] = .int(Int64(uid))
        o["gid"] = .int(Int64(gid))
        o["pid"] = .int(Int64(pid))
        o["client"] = .string(client)
        o["program"] = .string(program)
        o["system_metrics"] = .bool(systemMetrics)
        o["seq"] = .int(Int64(seq))
        o["tracking"] = tracking.json
        o["evaluation_runs"] = idMap(evaluationRuns)
        o["chain_runs"] = idMap(chainRuns)
        o["other_runs"] = .array(otherRuns.map { .string($0) })
        o["replies"] = .object(cached)
        o["open_artifacts"] = .array(openArtifacts.sorted().map { .int($0) })
        o["next_artifact"] = .int(nextArtifactID)
        return .object(o)
    }

    /// Reads what `json` wrote; `nil` for another version or shape.
    public init?(json: JSONValue) {
        func idMap(_ v: JSONValue?) -> [Int64: String] {
            var out: [Int64: String] = [:]
            for (key, value) in v?.objectValue ?? [:] { if let id = Int64(key), let s = value.stringValue { out[id] = s } }
            return out
        }
        guard let o = json.objectValue, o["v"]?.intValue == Self.version, let id = o["id"]?.stringValue,
            let uid = o["uid"]?.intValue, let seq = o["seq"]?.intValue, let tracking = o["tracking"].flatMap(TrackingState.init(json:))
        else { return nil }
        self.id = id
        self.uid = UInt32(truncatingIfNeeded: uid)
        self.gid = UInt32(truncatingIfNeeded: o["gid"]?.intValue ?? 0)
        self.pid = Int32(truncatingIfNeeded: o["pid"]?.intValue ?? 0)
        self.client = o["client"]?.stringValue ?? ""
        self.program = o["program"]?.stringValue ?? ""
        self.systemMetrics = o["system_metrics"]?.boolValue ?? true
        self.seq = UInt64(max(0, seq))
        self.tracking = tracking
        self.evaluationRuns = idMap(o["evaluation_runs"])
        self.chainRuns = idMap(o["chain_runs"])
        self.otherRuns = o["other_runs"]?.arrayValue?.compactMap(\.stringValue) ?? []
        var replies: [UInt64: CachedReply] = [:]
        for (key, value) in o["replies"]?.objectValue ?? [:] {
            guard let seq = UInt64(key) else { continue }
            if let body = value["reply"]?.objectValue {
                replies[seq] = .reply(body)
            } else if let handle = value["run"]?.stringValue {
                replies[seq] = .run(handle: handle)
            } else if let code = value["error"]?["code"]?.stringValue.flatMap(ErrorCode.init(rawValue:)) {
                replies[seq] = .error(ProtocolError(code, value["error"]?["message"]?.stringValue ?? ""))
            }
        }
        self.replies = replies
        self.openArtifacts = o["open_artifacts"]?.arrayValue?.compactMap(\.intValue) ?? []
        self.nextArtifactID = o["next_artifact"]?.intValue ?? 1
    }

    public init(
        id: String, uid: UInt32, gid: UInt32, pid: Int32, client: String, program: String, systemMetrics: Bool, seq: UInt64,
        tracking: TrackingState, evaluationRuns: [Int64: String], chainRuns: [Int64: String], otherRuns: [String],
        replies: [UInt64: CachedReply], openArtifacts: [Int64], nextArtifactID: Int64
    ) {
        self.id = id
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.client = client
        self.program = program
        self.systemMetrics = systemMetrics
        self.seq = seq
        self.tracking = tracking
        self.evaluationRuns = evaluationRuns
        self.chainRuns = chainRuns
        self.otherRuns = otherRuns
        self.replies = replies
        self.openArtifacts = openArtifacts
        self.nextArtifactID = nextArtifactID
    }

    /// Every run handle the session writes.
    public var runHandles: [String] { Array(evaluationRuns.values) + Array(chainRuns.values) + otherRuns }
}
