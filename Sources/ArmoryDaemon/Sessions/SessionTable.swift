import ArmoryProtocol
import DequeModule
import Synchronization

/// Every client session the daemon holds, attached to a connection or waiting for its client to
/// resume it (docs/architecture.md, "Sessions outlive connections"). A session is used by one
/// connection at a time: a resume while an older connection still carries it closes that one
/// first and hands the session over once it let go.
public final class SessionTable: Sendable {
    /// What `claim` found for a `resume`.
    public enum Claim: Sendable {
        case session(Session)
        /// A session restored from the journal, not yet rebuilt.
        case restored(SessionRecord)
        case refused(ProtocolError)
        /// The session ended (expired, or its client said `bye`): the reason for `resumed: false`.
        case ended(String)
        /// No such session is known (it ended before a restart, or a crash took it before it
        /// was journaled): the reason for `resumed: false`.
        case notFound(String)
    }

    private enum Slot {
        case attached(Session, connection: UInt64, close: @Sendable () -> Void)
        case detached(Session, generation: UInt64)
        case restored(SessionRecord, generation: UInt64)
    }

    private struct State {
        var slots: [String: Slot] = [:]
        var handovers: [String: [@Sendable () -> Void]] = [:]
        var generation: UInt64 = 0
        var expired = 0
        var ended = 0
        /// The latest sessions that ended, oldest first (at most `State.endedKept`).
        var endedIDs: Set<String> = []
        var endedOrder: Deque<String> = []

        /// How many ended sessions are remembered (about 100 bytes each).
        static let endedKept = 16_384

        mutating func remember(ended id: String) {
            guard endedIDs.insert(id).inserted else { return }
            endedOrder.append(id)
            if endedOrder.count > Self.endedKept { endedIDs.remove(endedOrder.removeFirst()) }
        }
    }

    private let state = Mutex(State())
    private let numbers = Atomic<UInt64>(1)
    /// How long a detached session waits for its client (`--orphan-grace`).
    public let graceSeconds: Double
    /// Runs `body` after `seconds` (the daemon's event loop; tests pass their own).
    private let schedule: @Sendable (Double, @escaping @Sendable () -> Void) -> Void
    /// Told when a session expired (its runs end FAILED, its end is journaled).
    private let onExpired: @Sendable (_ session: Session?, _ record: SessionRecord?) -> Void

    public init(
        graceSeconds: Double, schedule: @escaping @Sendable (Double, @escaping @Sendable () -> Void) -> Void,
        onExpired: @escaping @Sendable (Session?, SessionRecord?) -> Void
    ) {
        self.graceSeconds = graceSeconds
        self.schedule = schedule
        self.onExpired = onExpired
    }

    /// A fresh owner token for a session's runs.
    public func nextNumber() -> UInt64 { numbers.wrappingAdd(1, ordering: .relaxed).oldValue }

    /// A session's first `hello` was answered: it is carried by `connection`.
    public func opened(_ session: Session, connection: UInt64, close: @escaping @Sendable () -> Void) {
        state.withLock { $0.slots[session.id] = .attached(session, connection: connection, close: close) }
    }

    /// Sessions restored from the journal after a restart, waiting for their clients.
    public func restore(_ records: [SessionRecord]) {
        let generations = state.withLock { s -> [(String, UInt64)] in
            var out: [(String, UInt64)] = []
            for record in records where s.slots[record.id] == nil {
                s.generation += 1
                s.slots[record.id] = .restored(record, generation: s.generation)
                out.append((record.id, s.generation))
            }
            return out
        }
        for (id, generation) in generations { expireLater(id, generation: generation) }
    }

    /// The connection carrying `session` closed: it waits `graceSeconds` for a resume.
    public func detached(_ session: Session) {
        let released = release(session) { s -> UInt64 in
            s.generation += 1
            s.slots[session.id] = .detached(session, generation: s.generation)
            return s.generation
        }
        guard let (generation, handovers) = released else { return }
        for handover in handovers { handover() }
        expireLater(session.id, generation: generation)
    }

    /// The connection carrying `session` closed after its client said `bye`: the session ends
    /// now, as if its grace period were over (its end journaled, runs it left open ended FAILED).
    public func ended(_ session: Session) {
        let released = release(session) { s in
            s.slots[session.id] = nil
            s.ended += 1
            s.remember(ended: session.id)
        }
        guard let (_, handovers) = released else { return }
        onExpired(session, nil)
        for handover in handovers { handover() }
    }

    /// Lets `session` go from its connection, if that still carries it: `change` sets what its
    /// slot becomes. Returns what `change` returned and the resumes that waited for the release.
    private func release<T>(_ session: Session, _ change: (inout State) -> T) -> (T, [@Sendable () -> Void])? {
        state.withLock { s in
            guard case .attached(let current, _, _)? = s.slots[session.id], current === session else { return nil }
            return (change(&s), s.handovers.removeValue(forKey: session.id) ?? [])
        }
    }

    /// Takes session `id` for a client of `uid` on `connection`. An attached session is first
    /// closed on its old connection; `done` is called once the claim is settled.
    public func claim(_ id: String, uid: UInt32, connection: UInt64, close: @escaping @Sendable () -> Void, _ done: @escaping @Sendable (Claim) -> Void) {
        enum Step {
            case done(Claim)
            case wait(@Sendable () -> Void)
        }
        let step = state.withLock { s -> Step in
            let owner: UInt32
            switch s.slots[id] {
            case nil where s.endedIDs.contains(id):
                return .done(.ended("ended: session \(id) ended (its client said it was exiting, or nobody resumed it within --orphan-grace, \(Int(graceSeconds)) s)"))
            case nil: return .done(.notFound("expired or unknown: no session \(id) is held (a session ends \(Int(graceSeconds)) s after its connection, --orphan-grace)"))
            case .attached(let session, _, _)?, .detached(let session, _)?: owner = session.peer.uid
            case .restored(let record, _)?: owner = record.uid
            }
            guard uid == owner || uid == 0 else {
                return .done(.refused(ProtocolError(.permissionDenied, "Permission denied: session \(id) belongs to uid \(owner); only that user can resume it. Open a new session (hello without resume).")))
            }
            switch s.slots[id]! {
            case .attached(_, _, let closeOld):
                s.handovers[id, default: []].append { [self] in claim(id, uid: uid, connection: connection, close: close, done) }
                return .wait(closeOld)
            case .detached(let session, _):
                s.slots[id] = .attached(session, connection: connection, close: close)
                return .done(.session(session))
            case .restored(let record, _):
                // Rebuilt by the caller, who then calls `opened`; nobody else may take it meanwhile.
                s.slots[id] = nil
                return .done(.restored(record))
            }
        }
        switch step {
        case .done(let claim): done(claim)
        case .wait(let closeOld): closeOld()
        }
    }

    /// Sessions held now: attached, detached, restored and not yet resumed; and how many expired
    /// and how many their clients ended (`bye`).
    public var counts: (attached: Int, waiting: Int, expired: Int, ended: Int) {
        state.withLock { s in
            let attached = s.slots.values.filter { if case .attached = $0 { true } else { false } }.count
            return (attached, s.slots.count - attached, s.expired, s.ended)
        }
    }

    private func expireLater(_ id: String, generation: UInt64) {
        schedule(graceSeconds) { [self] in
            let gone = state.withLock { s -> Slot? in
                switch s.slots[id] {
                case .detached(_, let g)? where g == generation, .restored(_, let g)? where g == generation:
                    s.expired += 1
                    s.remember(ended: id)
                    return s.slots.removeValue(forKey: id)
                default:
                    return nil
                }
            }
            switch gone {
            case .detached(let session, _)?: onExpired(session, nil)
            case .restored(let record, _)?: onExpired(nil, record)
            default: break
            }
        }
    }
}
