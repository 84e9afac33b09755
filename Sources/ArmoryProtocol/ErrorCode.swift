/// The stable error codes of the protocol (`{"op":"error","code":…}`).
public enum ErrorCode: String, Sendable, CaseIterable, Error {
    case frameTooLarge = "FRAME_TOO_LARGE"
    case badJSON = "BAD_JSON"
    case badFrame = "BAD_FRAME"
    case unknownOp = "UNKNOWN_OP"
    case unsupportedProtocol = "UNSUPPORTED_PROTOCOL"
    case helloRequired = "HELLO_REQUIRED"
    /// A member that has the right type but says nothing the daemon can act on (e.g. `resume`).
    case badRequest = "BAD_REQUEST"
    case invalidKey = "INVALID_KEY"
    case invalidValue = "INVALID_VALUE"
    case paramChanged = "PARAM_CHANGED"
    case unknownHandle = "UNKNOWN_HANDLE"
    case invalidState = "INVALID_STATE"
    case permissionDenied = "PERMISSION_DENIED"
    case tooManyConnections = "TOO_MANY_CONNECTIONS"
    /// A client names one more destination of its own than `--max-destinations-per-user` allows.
    case tooManyDestinations = "TOO_MANY_DESTINATIONS"
    case notFound = "NOT_FOUND"
    case sinkRejected = "SINK_REJECTED"
    /// The daemon restarted while an artifact was being sent: send it again from its first chunk.
    case artifactInterrupted = "ARTIFACT_INTERRUPTED"
    case unreachable = "UNREACHABLE"
    /// The destination refuses the daemon's credentials (401, 403): records wait in the journal,
    /// and a caller waiting for uploads is told at once what to do.
    case authRequired = "AUTH_REQUIRED"
    case internalError = "INTERNAL"
}

/// A protocol-level failure: a code, a message that says what to do, and the frame it answers.
public struct ProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
    public var code: ErrorCode
    public var message: String
    /// The `seq` of the frame this error answers, when it is known.
    public var seq: UInt64?
    /// The op of that frame (`log`, `param`, …), when it is known.
    public var op: String?
    /// The metric, param or tag key the refusal is about, when there is one.
    public var key: String?

    public init(_ code: ErrorCode, _ message: String, seq: UInt64? = nil, op: String? = nil, key: String? = nil) {
        self.code = code
        self.message = message
        self.seq = seq
        self.op = op
        self.key = key
    }

    public var description: String {
        let origin = [op.map { "op '\($0)'" }, seq.map { "seq \($0)" }].compactMap { $0 }.joined(separator: ", ")
        return "\(code.rawValue)\(origin.isEmpty ? "" : " (\(origin))"): \(message)"
    }
}
