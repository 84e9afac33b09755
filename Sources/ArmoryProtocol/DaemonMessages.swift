/// Every frame the daemon sends: acks, errors and replies.
public enum DaemonMessage: Sendable, Equatable {
    /// Every frame up to `upto` on this connection is accepted (durable once the journal exists).
    case ack(upto: UInt64)
    /// A request failed, or a fire-and-forget op was rejected; `seq` names the frame.
    case error(ProtocolError)
    /// The answer to the request with this `seq`.
    case reply(seq: UInt64, body: JSONObject)

    public var json: JSONValue {
        switch self {
        case .ack(let upto):
            return .object(["op": "ack", "upto": .int(Int64(upto))])
        case .error(let e):
            var o: JSONObject = ["op": "error"]
            o["seq"] = e.seq.map { .int(Int64($0)) } ?? .null
            o["failed_op"] = e.op.map { .string($0) } ?? .null
            if let key = e.key { o["key"] = .string(key) }
            o["code"] = .string(e.code.rawValue)
            o["message"] = .string(e.message)
            return .object(o)
        case .reply(let seq, let body):
            var o: JSONObject = ["op": "reply", "seq": .int(Int64(seq))]
            for (k, v) in body { o[k] = v }
            return .object(o)
        }
    }

    public var encoded: [UInt8] { Frame.encode(json.serialized) }

    public static func decode(payload: [UInt8]) throws(ProtocolError) -> DaemonMessage {
        let json: JSONValue
        do { json = try JSONParser.parse(payload) } catch {
            throw ProtocolError(.badJSON, "The daemon sent a frame that is not JSON (\(error)).")
        }
        guard case .object(var o) = json, let op = o["op"]?.stringValue else {
            throw ProtocolError(.badFrame, "The daemon sent a frame without an op.")
        }
        switch op {
        case "ack":
            guard let upto = o["upto"]?.intValue else { throw ProtocolError(.badFrame, "ack without upto") }
            return .ack(upto: UInt64(upto))
        case "error":
            let code = ErrorCode(rawValue: o["code"]?.stringValue ?? "") ?? .internalError
            let seq = o["seq"]?.intValue.map { UInt64($0) }
            return .error(ProtocolError(code, o["message"]?.stringValue ?? "", seq: seq, op: o["failed_op"]?.stringValue, key: o["key"]?.stringValue))
        case "reply":
            guard let seq = o["seq"]?.intValue else { throw ProtocolError(.badFrame, "reply without seq") }
            o.removeValue(forKey: "op")
            o.removeValue(forKey: "seq")
            return .reply(seq: UInt64(seq), body: o)
        default:
            throw ProtocolError(.unknownOp, "The daemon sent an unknown op '\(op)'.")
        }
    }
}

extension JSONValue: ExpressibleByStringLiteral {
    public init(stringLiteral value: String) { self = .string(value) }
}

/// What the daemon knows of one run: the `start`, `attach` and `run_info` replies.
public struct RunDescriptor: Sendable, Equatable {
    /// The daemon's handle: what `log`, `end` and artifact ops name.
    public var handle: String
    /// MLflow's run id, once the run exists in the store (`nil` while pending).
    public var runID: String?
    public var experimentID: String?
    public var name: String
    public var status: RunStatus
    /// The parent run, for a chain.
    public var parentHandle: String?

    public init(handle: String, runID: String?, experimentID: String?, name: String, status: RunStatus, parentHandle: String? = nil) {
        self.handle = handle
        self.runID = runID
        self.experimentID = experimentID
        self.name = name
        self.status = status
        self.parentHandle = parentHandle
    }

    public var json: JSONObject {
        var o: JSONObject = ["handle": .string(handle)]
        o["run_id"] = runID.map { .string($0) } ?? .null
        o["experiment_id"] = experimentID.map { .string($0) } ?? .null
        o["name"] = .string(name)
        o["status"] = .string(status.rawValue)
        if let parentHandle { o["parent"] = .string(parentHandle) }
        return o
    }

    public init?(json o: JSONObject) {
        guard let handle = o["handle"]?.stringValue, let status = o["status"]?.stringValue.flatMap(RunStatus.init(rawValue:)) else { return nil }
        self.init(
            handle: handle, runID: o["run_id"]?.stringValue, experimentID: o["experiment_id"]?.stringValue,
            name: o["name"]?.stringValue ?? "", status: status, parentHandle: o["parent"]?.stringValue)
    }
}

/// The daemon's answer to `hello`.
public struct HelloReply: Sendable, Equatable {
    public var daemonVersion: String
    public var protocolVersion: Int
    public var limits: ProtocolLimits
    /// The peer's identity as the daemon sees it (from the socket, not from the client).
    public var uid: UInt32
    public var pid: Int32
    /// Where this connection's runs go (`file:///…` or the server's URL, never with credentials).
    public var destination: String?
    /// The session this connection carries (what a later `hello` names in `resume`).
    public var session: String?
    /// The outcome of `resume`: `nil` when none was asked.
    public var resumed: Resumed?

    /// What a `resume` found: the session continues from `held` (the highest `seq` the daemon holds
    /// for it: the client resends the frames after it), or a new session was opened and why.
    public enum Resumed: Sendable, Equatable {
        case continued(held: UInt64)
        case notResumed(reason: String)
    }

    public init(
        daemonVersion: String, protocolVersion: Int, limits: ProtocolLimits, uid: UInt32, pid: Int32, destination: String? = nil,
        session: String? = nil, resumed: Resumed? = nil
    ) {
        self.session = session
        self.resumed = resumed
        self.daemonVersion = daemonVersion
        self.protocolVersion = protocolVersion
        self.limits = limits
        self.uid = uid
        self.pid = pid
        self.destination = destination
    }

    public var json: JSONObject {
        var o: JSONObject = [
            "daemon_version": .string(daemonVersion),
            "protocol": .int(Int64(protocolVersion)),
            "limits": .object([
                "max_frame_bytes": .int(Int64(limits.maxFrameBytes)),
                "max_chunk_bytes": .int(Int64(limits.maxChunkBytes)),
                "max_depth": .int(Int64(limits.maxDepth)),
                "max_key_length": .int(Int64(MLflowRules.maxKeyLength)),
                "max_param_value_length": .int(Int64(MLflowRules.maxParamValueLength)),
                "max_tag_value_length": .int(Int64(MLflowRules.maxTagValueLength)),
            ]),
            "uid": .int(Int64(uid)),
            "pid": .int(Int64(pid)),
            "destination": destination.map { .string($0) } ?? .null,
        ]
        if let session { o["session"] = .string(session) }
        switch resumed {
        case .continued(let held)?:
            o["resumed"] = .bool(true)
            o["held"] = .int(Int64(held))
        case .notResumed(let reason)?:
            o["resumed"] = .bool(false)
            o["reason"] = .string(reason)
        case nil:
            break
        }
        return o
    }

    public init?(json o: JSONObject) {
        guard let version = o["daemon_version"]?.stringValue, let proto = o["protocol"]?.intValue, let limits = o["limits"] else { return nil }
        self.init(
            daemonVersion: version, protocolVersion: Int(proto),
            limits: ProtocolLimits(
                maxFrameBytes: Int(limits["max_frame_bytes"]?.intValue ?? Int64(ProtocolLimits.default.maxFrameBytes)),
                maxChunkBytes: Int(limits["max_chunk_bytes"]?.intValue ?? Int64(ProtocolLimits.default.maxChunkBytes)),
                maxDepth: Int(limits["max_depth"]?.intValue ?? Int64(ProtocolLimits.default.maxDepth))),
            uid: UInt32(o["uid"]?.intValue ?? 0), pid: Int32(o["pid"]?.intValue ?? 0), destination: o["destination"]?.stringValue,
            session: o["session"]?.stringValue)
        switch o["resumed"]?.boolValue {
        case true?: resumed = .continued(held: UInt64(max(0, o["held"]?.intValue ?? 0)))
        case false?: resumed = .notResumed(reason: o["reason"]?.stringValue ?? "")
        case nil: resumed = nil
        }
    }
}

/// The daemon's answer to `flush`: whether everything was reached within the bound, and what is left.
public struct FlushReply: Sendable, Equatable {
    public var complete: Bool
    public var pendingRecords: Int
    public var level: FlushLevel
    /// What the caller should know although its records are safe (a destination waiting for
    /// credentials): client libraries show each once.
    public var warnings: [String]

    public init(complete: Bool, pendingRecords: Int, level: FlushLevel, warnings: [String] = []) {
        self.complete = complete
        self.pendingRecords = pendingRecords
        self.level = level
        self.warnings = warnings
    }

    public var json: JSONObject {
        var o: JSONObject = ["complete": .bool(complete), "pending_records": .int(Int64(pendingRecords)), "wait": .string(level.rawValue)]
        if !warnings.isEmpty { o["warnings"] = .array(warnings.map { .string($0) }) }
        return o
    }

    public init?(json o: JSONObject) {
        guard let complete = o["complete"]?.boolValue else { return nil }
        self.init(
            complete: complete, pendingRecords: Int(o["pending_records"]?.intValue ?? 0),
            level: o["wait"]?.stringValue.flatMap(FlushLevel.init(rawValue:)) ?? .durable,
            warnings: o["warnings"]?.arrayValue?.compactMap(\.stringValue) ?? [])
    }
}
