import ArmoryDaemon
import ArmoryProtocol

/// Drives a `SessionStateMachine` frame by frame: no socket, no uploader, no journal. It answers
/// the actions that ask the connection for something (a resolved destination, an opened spool
/// file, a run found in the store) with the state machine's own events, and keeps what each
/// frame committed.
public struct SessionHarness {
    public let registry = RunRegistry()
    /// Runs the destination holds, for `attach` (`findRun`).
    public var stored: [String: StoredRun] = [:]
    /// Every record committed so far, in order.
    public private(set) var records: [SessionRecordOut] = []
    /// The journal entry of the latest commit (the session's record or its mark).
    public private(set) var lastTail: JournalEntry?

    private var numbers: UInt64 = 0
    private var seqs: [String: UInt64] = [:]

    public init() {}

    public mutating func session(uid: UInt32 = 1000) -> SessionStateMachine {
        numbers += 1
        var machine = SessionStateMachine(
            number: numbers, peer: PeerCredentials(uid: uid, gid: uid, pid: 4242), runs: registry,
            userName: "user\(uid)", spoolDirectory: "/spool")
        send(&machine, .hello(Hello(client: "test", clientVersion: "1", program: "/t.py")))
        return machine
    }

    /// Sends an op as a read burst of its own (its records are then committed) and answers the
    /// action's follow-up events. `.success`: a reply, `nil`: no answer (fire-and-forget).
    @discardableResult
    public mutating func send(_ machine: inout SessionStateMachine, _ op: ClientOp, seq given: UInt64? = nil) -> Result<JSONObject, ProtocolError>? {
        let seq = given ?? (seqs[machine.id] ?? 0) + 1
        seqs[machine.id] = max(seqs[machine.id] ?? 0, seq)
        let frame = ClientFrame(seq: seq, op: op)
        let result = resolve(machine.receive(frame, nowMs: 1_795_400_000_000), of: frame, &machine)
        commit(&machine)
        return result
    }

    /// Takes what the state machine committed.
    public mutating func commit(_ machine: inout SessionStateMachine) {
        guard let commit = machine.commit() else { return }
        records += commit.records
        lastTail = commit.tail
    }

    private mutating func resolve(_ action: SessionAction, of frame: ClientFrame, _ machine: inout SessionStateMachine) -> Result<JSONObject, ProtocolError>? {
        switch action {
        case .none, .writeSpool: return nil
        case .reply(let body): return .success(body)
        case .error(let error), .close(let error): return .failure(error)
        case .handshake(let hello):
            machine.accept(hello, destination: .primary, assignsRunIDs: true, peer: machine.peer)
            return .success(["session": .string(machine.id)])
        case .awaitRun(let handle, _):
            guard let entry = registry.entry(handle) else { return .failure(ProtocolError(.unknownHandle, handle)) }
            return .success(entry.descriptor.json)
        case .openSpool(let id, _):
            return resolve(machine.spoolOpened(artifact: id, for: frame), of: frame, &machine)
        case .closeSpool(let id):
            return resolve(machine.spoolClosed(artifact: id, for: frame), of: frame, &machine)
        case .findRun(let runID):
            return resolve(machine.runFound(stored[runID], runID: runID, in: "the store", for: frame).action, of: frame, &machine)
        case .askDestination, .awaitDurable, .awaitUploaded, .query:
            return .failure(ProtocolError(.internalError, "\(action) is carried out by the connection"))
        }
    }

    /// The reply to a request (throws its error).
    public mutating func reply(_ machine: inout SessionStateMachine, _ op: ClientOp) throws -> JSONObject {
        guard let result = send(&machine, op) else { throw ProtocolError(.internalError, "no reply to \(op.name)") }
        return try result.get()
    }

    public mutating func descriptor(_ machine: inout SessionStateMachine, _ op: ClientOp) throws -> RunDescriptor {
        guard let d = RunDescriptor(json: try reply(&machine, op)) else { throw ProtocolError(.internalError, "not a run") }
        return d
    }

    /// The records committed for run `handle`.
    public func records(of handle: String) -> [SinkRecord] {
        records.filter { $0.handle == handle }.map(\.record)
    }

    /// The log batches committed for run `handle`.
    public func batches(of handle: String) -> [LogBatch] {
        records(of: handle).compactMap { if case .log(let batch) = $0 { batch } else { nil } }
    }
}
