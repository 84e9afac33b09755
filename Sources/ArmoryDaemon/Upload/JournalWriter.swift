import DequeModule
import Synchronization

/// A destination's journal writer (docs/architecture.md, "The pipeline"): appends what producers
/// hand it to the journal, hands the records on to the sender in the same order, and keeps each
/// user's share of the unsettled journal (fair shares). It shares no lock with the sender: the
/// sender takes the records from its inbox and tells the journal what is settled, which is where
/// the writer reads it back.
final class JournalWriter: Sendable {
    /// What an append did: the last record's sequence number (what a `flush wait=uploaded` waits
    /// for), the last entry's (what `whenDurable` takes), and whether producers should pause.
    struct Appended: Sendable {
        var lastRecord: UInt64
        var lsn: UInt64
        var overloaded: Bool
    }

    private struct State {
        /// Journal bytes not yet settled, per producing uid, and the runs of records they came in
        /// (consecutive records of one uid share an entry).
        var bytesByUID: [UInt32: Int] = [:]
        var owed = Deque<(through: UInt64, uid: UInt32, bytes: Int)>()
        var lastRecord: UInt64 = 0
        var journalBytes = 0
        /// Producers paused until the journal shrinks or settles enough.
        var paused: [(uid: UInt32?, callback: @Sendable () -> Void)] = []
        /// Whether the journal will say when it settled or shrank.
        var watching = false
    }

    let journal: Journal
    let bounds: UploadBounds
    private let sender: Sender
    /// Held across an append and its handover, so the sender receives records in journal order.
    private let state: Mutex<State>

    init(journal: Journal, bounds: UploadBounds, sender: Sender) {
        self.journal = journal
        self.bounds = bounds
        self.sender = sender
        state = Mutex(State(lastRecord: journal.appendedLSN, journalBytes: journal.diskBytes))
    }

    /// Appends records and then `tail` (a session's record or mark), in one write: a restart
    /// finds both or neither. `uid`: the client user they come from, whose share of the backlog
    /// they count against (`overloaded` is then about that user).
    func append(_ records: [(handle: String, record: SinkRecord, completion: RecordCompletion?)], tail: JournalEntry?, uid: UInt32?) -> Appended {
        let entries = records.map { JournalEntry.record(handle: $0.handle, $0.record) } + (tail.map { [$0] } ?? [])
        let encoded = entries.map { (entry: $0, body: Journal.encode($0)) }  // outside the lock
        return state.withLock { s in
            let appended = journal.append(encoded)
            guard let last = appended.last else { return Appended(lastRecord: s.lastRecord, lsn: s.lastRecord, overloaded: false) }
            s.journalBytes = last.journalBytes
            if let uid {
                let bytes = encoded.reduce(0) { $0 + $1.body.count }
                s.bytesByUID[uid, default: 0] += bytes
                if let tail = s.owed.last, tail.uid == uid {
                    s.owed[s.owed.count - 1] = (last.lsn, uid, tail.bytes + bytes)
                } else {
                    s.owed.append((last.lsn, uid, bytes))
                }
            }
            var handed: [JournaledRecord] = []
            var completions: [(sequence: UInt64, completion: RecordCompletion)] = []
            handed.reserveCapacity(records.count)
            for (r, a) in zip(records, appended) {
                handed.append(.init(handle: r.handle, record: r.record, sequence: a.lsn, uid: uid))
                if let completion = r.completion { completions.append((a.lsn, completion)) }
            }
            if !records.isEmpty { s.lastRecord = appended[records.count - 1].lsn }
            sender.receive(handed, completions: completions, appendedThrough: last.lsn)
            // The shares count what is not settled yet; they are brought up to date only when
            // they would pause someone (they only overestimate until then), or grow long.
            var overloaded = isOverloaded(s, uid: uid, resuming: false)
            if overloaded || s.owed.count > 4096 {
                release(&s, settled: journal.settledSequence)
                overloaded = isOverloaded(s, uid: uid, resuming: false)
            }
            return Appended(lastRecord: s.lastRecord, lsn: last.lsn, overloaded: overloaded)
        }
    }

    /// The sequence number of the last record appended.
    var lastRecord: UInt64 { state.withLock { $0.lastRecord } }

    /// Gives back the shares of what the journal settled.
    private func release(_ s: inout State, settled: UInt64) {
        while let first = s.owed.first, first.through <= settled {
            s.owed.removeFirst()
            s.bytesByUID[first.uid, default: 0] -= first.bytes
            if s.bytesByUID[first.uid] ?? 0 <= 0 { s.bytesByUID[first.uid] = nil }
        }
    }

    /// Journal bytes not yet settled, per client uid (what fair shares weigh).
    var backlogByUID: [UInt32: Int] {
        let settled = journal.settledSequence
        return state.withLock { s in
            release(&s, settled: settled)
            return s.bytesByUID
        }
    }

    /// Whether producers of `uid` (nil: any) should pause now.
    func isOverloaded(uid: UInt32?) -> Bool {
        state.withLock { s in
            guard isOverloaded(s, uid: uid, resuming: false) else { return false }
            release(&s, settled: journal.settledSequence)
            return isOverloaded(s, uid: uid, resuming: false)
        }
    }

    /// Fair shares (docs/architecture.md, "Backpressure and fair shares"): a uid pauses past its
    /// share of the backlog bound while another uid's records wait too; past the bound itself,
    /// those over their share (or alone) pause, never one under its share. `resuming`: whether
    /// paused producers may go on (below three quarters of the bound and the share).
    private func isOverloaded(_ s: State, uid: UInt32?, resuming: Bool) -> Bool {
        let bound = resuming ? 0.75 : 1
        let mine = uid.flatMap { s.bytesByUID[$0] } ?? 0
        let othersWait = uid.map { uid in s.bytesByUID.contains { $0.key != uid && $0.value > 0 } } ?? true
        let overShare = uid != nil && Double(mine) > Double(bounds.userShareBytes) * bound
        if overShare && othersWait { return true }
        return Double(s.journalBytes) > Double(bounds.maxBacklogBytes) * bound && (overShare || !othersWait || uid == nil)
    }

    /// Calls `callback` once producers of `uid` may go on: the journal (and the user's share)
    /// back under three quarters of the bound.
    func whenDrained(uid: UInt32?, _ callback: @escaping @Sendable () -> Void) {
        state.withLock { $0.paused.append((uid, callback)) }
        checkPaused()
    }

    /// Lets paused producers go on that may, and asks the journal to say when it settled or
    /// shrank while some still wait.
    private func checkPaused() {
        let settled = journal.settledSequence
        let diskBytes = journal.diskBytes
        let (ready, watch) = state.withLock { s -> ([@Sendable () -> Void], Bool) in
            release(&s, settled: settled)
            s.journalBytes = diskBytes
            var ready: [@Sendable () -> Void] = []
            var waiting: [(uid: UInt32?, callback: @Sendable () -> Void)] = []
            for waiter in s.paused {
                if isOverloaded(s, uid: waiter.uid, resuming: true) { waiting.append(waiter) } else { ready.append(waiter.callback) }
            }
            s.paused = waiting
            let watch = !s.paused.isEmpty && !s.watching
            if watch { s.watching = true }
            return (ready, watch)
        }
        for callback in ready { callback() }
        guard watch else { return }
        journal.whenSettledOrReclaimed(after: settled) { [weak self] in
            guard let self else { return }
            state.withLock { $0.watching = false }
            checkPaused()
        }
    }
}
