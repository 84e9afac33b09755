import ArmoryProtocol
import DequeModule
import Foundation
import Logging
import MLflow
import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Runs tasks on one NIO event loop thread: the uploader's own, so that neither blocking file
/// writes nor a busy cooperative pool can stall the other.
final class EventLoopTaskExecutor: TaskExecutor {
    let loop: any EventLoop

    init(loop: any EventLoop) { self.loop = loop }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        loop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}

/// Sends records to the sink: an `UploadScheduler` under a lock, driven by a task that keeps up
/// to `sink.concurrency` calls in flight, wakes on new records and on backoff or batching timers.
///
/// Every record gets a sequence number (its journal sequence number when there is a journal);
/// `whenSettled` tells a `flush wait=uploaded` when everything up to one is settled (applied or
/// refused), and the journal learns the same watermark and each run's MLflow id.
///
/// Memory stays bounded whatever the backlog: past `memoryBytes` of queued records, new records
/// live only in the journal and are read back from disk as the sink catches up. Producers are
/// told to pause (connections stop reading) only when the journal itself reaches
/// `maxBacklogBytes` (without a journal: past `highWater` queued records).
public final class Uploader: Sendable {
    /// A record's outcome: its run's binding when it created one, or the refusal.
    public typealias Completion = @Sendable (Result<UploadScheduler.Binding?, ProtocolError>) -> Void

    /// Counters reported by `armoryctl status`.
    public struct Counters: Sendable, Equatable {
        public var pendingRecords = 0
        public var appliedRecords: UInt64 = 0
        public var metricsWritten: UInt64 = 0
        /// Of `metricsWritten`, those named `system/…` (host metrics).
        public var systemMetricsWritten: UInt64 = 0
        public var rejectedRecords: UInt64 = 0
        /// Refused records (down to the refused entities) written to the dead-letter file.
        public var deadLetters: UInt64 = 0
        public var retries: UInt64 = 0
        /// Records that wait in the journal only (memory bound reached).
        public var spilledRecords = 0
        public var lastError: String?
        public var lastErrorMs: Int64?
        public var lastSuccessMs: Int64?
        /// Why the server refuses the credentials (401, 403), while it does: records wait.
        public var needsCredentials: String?
        /// Metrics written per second, over the last ten seconds.
        public var writeRate = RateWindow()

        /// The most recent sink call failed: the store is refusing or unreachable.
        public var isDegraded: Bool {
            guard let lastErrorMs else { return false }
            return lastErrorMs > (lastSuccessMs ?? 0)
        }
    }

    /// Bounds on what the uploader holds.
    public struct Bounds: Sendable {
        /// Without a journal: queued records past which producers pause.
        public var highWater: Int = 200_000
        /// With a journal: bytes of queued records kept in memory; the rest waits on disk.
        public var memoryBytes: Int = 16 << 20
        /// With a journal: its size past which producers pause.
        public var maxBacklogBytes: Int = 8 << 30
        /// The part of `maxBacklogBytes` one uid may hold while another uid's records wait too:
        /// past it that user's connections pause, the others' go on.
        public var userShare: Double = 0.5

        public init(highWater: Int = 200_000, memoryBytes: Int = 16 << 20, maxBacklogBytes: Int = 8 << 30, userShare: Double = 0.5) {
            self.highWater = highWater
            self.memoryBytes = memoryBytes
            self.maxBacklogBytes = maxBacklogBytes
            self.userShare = userShare
        }

        /// The bytes one uid may hold while others wait.
        var userShareBytes: Int { Int(Double(maxBacklogBytes) * userShare) }
    }

    private struct State: Sendable {
        var scheduler: UploadScheduler
        var completions: [UInt64: Completion] = [:]
        var waiters: [(sequence: UInt64, callback: @Sendable () -> Void)] = []
        var drainedCallbacks: [(uid: UInt32?, callback: @Sendable () -> Void)] = []
        /// Journal bytes not yet settled, per producing uid, and the runs of records they came in
        /// (consecutive records of one uid share an entry).
        var bytesByUID: [UInt32: Int] = [:]
        var owed = Deque<(through: UInt64, uid: UInt32, bytes: Int)>()
        var counters = Counters()
        /// The records in memory, by ticket and sequence number.
        var queued = QueuedRecords()
        /// The last record a restart found in the journal.
        var replayedThrough: UInt64 = 0
        var lastSequence: UInt64 = 0
        var settledSequence: UInt64 = 0
        var memoryBytes = 0
        var journalBytes = 0
        var spill: Spill?
        var stopping = false
        var stopped = false
    }

    private let state: Mutex<State>
    private let sink: any RecordSink
    private let wake: AsyncStream<Void>.Continuation
    private let wakes: AsyncStream<Void>
    private let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    private let executor: EventLoopTaskExecutor
    public let bounds: Bounds
    /// Where accepted records are made durable (`nil`: in memory only).
    public let journal: Journal?
    /// Where refused records are kept (`nil`: they are counted and reported, then dropped).
    public let deadLetters: DeadLetterFile?
    /// Who owns each run (for the dead-letter file) and how to tell its writer about a refusal.
    private let registry: RunRegistry?
    private let logger = Logger(label: "armoryd")

    public init(
        sink: any RecordSink, bounds: Bounds = Bounds(), flushInterval: Double? = nil, journal: Journal? = nil,
        deadLetters: DeadLetterFile? = nil, registry: RunRegistry? = nil
    ) {
        self.sink = sink
        self.journal = journal
        self.deadLetters = deadLetters
        self.registry = registry
        self.bounds = bounds
        let interval = flushInterval ?? sink.defaultFlushInterval
        state = Mutex(State(scheduler: UploadScheduler(limits: sink.limits, flushIntervalNs: UInt64(max(0, interval) * 1e9))))
        (wakes, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        executor = EventLoopTaskExecutor(loop: group.next())
        journal?.onReclaim = { [weak self] in self?.checkDrained() }
    }

    public var destination: String { sink.destination }
    /// Whether the sink takes run ids assigned by the daemon (the local store does).
    public var assignsRunIDs: Bool { sink.assignsRunIDs }

    /// Runs a no-op on the uploader's event loop under its state lock, then `done` (what the
    /// watchdog's health check waits for: a sink call that blocks the loop holds it back).
    public func checkResponsive(_ done: @escaping @Sendable () -> Void) {
        executor.loop.execute { [self] in
            state.withLock { _ in }
            done()
        }
    }

    public func start() {
        Task(executorPreference: executor) { [self] in await run() }
    }

    // MARK: Producers

    /// What `enqueue` did: the record's sequence number (what `whenSettled` takes), the journal's
    /// (what `whenDurable` takes; 0 without a journal), and whether producers should pause.
    public struct Enqueued: Sendable {
        public var ticket: UInt64
        public var lsn: UInt64
        public var overloaded: Bool
    }

    /// Journals and enqueues a record of run `handle`.
    @discardableResult
    public func enqueue(_ handle: String, _ record: SinkRecord, completion: Completion? = nil) -> Enqueued {
        enqueue([(handle, record, completion)])
    }

    /// Journals and enqueues records in order, under one acquisition of each lock (a connection's
    /// read burst); returns what `enqueue` returns for the last one.
    /// `tail`, a journal-only entry (a session's record or mark), is appended right after them,
    /// in the same write: a restart finds both or neither. `uid`: the client user they come from,
    /// whose share of the backlog they count against (`overloaded` is then about that user).
    @discardableResult
    public func enqueue(_ records: [(handle: String, record: SinkRecord, completion: Completion?)], tail: JournalEntry? = nil, uid: UInt32? = nil) -> Enqueued {
        let now = Self.monotonicNs()
        let entries = records.map { JournalEntry.record(handle: $0.handle, $0.record) } + (tail.map { [$0] } ?? [])
        let encoded = journal == nil ? [] : entries.map { (entry: $0, body: Journal.encode($0)) }  // outside the locks
        let result = state.withLock { s -> Enqueued in
            guard let journal else {
                for (handle, record, completion) in records {
                    s.lastSequence += 1
                    queue(&s, handle, record, sequence: s.lastSequence, bytes: 0, now: now, completion: completion)
                }
                return Enqueued(ticket: s.lastSequence, lsn: 0, overloaded: s.scheduler.queuedEntries > bounds.highWater)
            }
            let appended = journal.append(encoded)
            if let uid, let last = appended.last {
                let bytes = encoded.reduce(0) { $0 + $1.body.count }
                s.bytesByUID[uid, default: 0] += bytes
                if let tail = s.owed.last, tail.uid == uid {
                    s.owed[s.owed.count - 1] = (last.lsn, uid, tail.bytes + bytes)
                } else {
                    s.owed.append((last.lsn, uid, bytes))
                }
            }
            for ((handle, record, completion), appended) in zip(records, appended) {
                s.lastSequence = appended.lsn
                s.journalBytes = appended.journalBytes
                let footprint = BatchLimits.memoryFootprint(record)
                let fits = s.memoryBytes + footprint <= bounds.memoryBytes
                if s.spill == nil && fits {
                    queue(&s, handle, record, sequence: appended.lsn, bytes: footprint, now: now, completion: completion)
                } else if s.spill?.letsThrough(handle, uid: uid) == true, s.memoryBytes + footprint <= bounds.memoryBytes + bounds.memoryBytes / 4 {
                    // A quarter more than the bound is kept for what goes around: the spill
                    // started with memory full.
                    s.spill!.wentAround(appended.lsn)
                    queue(&s, handle, record, sequence: appended.lsn, bytes: footprint, now: now, aroundSpill: true, completion: completion)
                } else {
                    if s.spill == nil { s.spill = Spill(firstUnloaded: appended.lsn, lastSpilled: appended.lsn) }
                    s.spill!.add(appended.lsn, handle: handle, uid: uid, completion: completion)
                }
            }
            return Enqueued(ticket: s.lastSequence, lsn: appended.last?.lsn ?? s.lastSequence, overloaded: isOverloaded(s, uid: uid, resuming: false))
        }
        if !records.isEmpty { wake.yield() }
        return result
    }

    /// Hands a record to the scheduler (in memory).
    private func queue(
        _ s: inout State, _ handle: String, _ record: SinkRecord, sequence: UInt64, bytes: Int, now: UInt64, mayExist: Bool = false, aroundSpill: Bool = false,
        completion: Completion?
    ) {
        let ticket = s.scheduler.enqueue(handle, record, now: now, mayExist: mayExist)
        s.queued.append(.init(ticket: ticket, sequence: sequence, bytes: bytes), aroundSpill: aroundSpill)
        s.memoryBytes += bytes
        if let completion { s.completions[ticket] = completion }
    }

    /// Calls the sink makes at once.
    public var concurrency: Int { sink.concurrency }

    /// The destination's id of a handle's run, once it exists there.
    public func runID(of handle: String) -> String? {
        binding(of: handle)?.runID
    }

    /// A handle's run at the destination, once created. Set under the same lock as the settled
    /// watermark, so a waiter told "settled" finds it (the registry learns it a moment later).
    public func binding(of handle: String) -> UploadScheduler.Binding? {
        state.withLock { $0.scheduler.bindings[handle] }
    }

    /// A run that already exists in MLflow (attached): its records need no create.
    public func attach(_ entry: RunEntry) {
        state.withLock { s in
            if let runID = entry.runID { s.scheduler.bind(entry.handle, .init(runID: runID, experimentID: entry.experimentID)) }
            journal?.append(.run(entry))
        }
    }

    /// Queues again what the journal holds unsettled after a restart: runs keep their ids, a
    /// create that may have reached the server looks for its run first, artifacts whose spool
    /// file is gone were already stored. Past the memory bound the rest is read back later.
    public func replay(_ recovery: Journal.Recovery) {
        let now = Self.monotonicNs()
        let runs = recovery.state.runs
        sink.replaying(runIDs: Set(runs.values.compactMap(\.runID)))
        let ready = state.withLock { s -> [@Sendable () -> Void] in
            for entry in runs.values {
                if let runID = entry.runID { s.scheduler.bind(entry.handle, .init(runID: runID, experimentID: entry.experimentID)) }
            }
            s.replayedThrough = recovery.state.lastRecordLSN
            let pending = recovery.state.unsettled
            for p in pending { requeue(&s, p, now: now) }
            if let disk = recovery.state.leftOnDisk {
                // The rest stays on disk: read back from the journal as the sink catches up.
                s.spill = Spill(firstUnloaded: disk.from, lastSpilled: recovery.state.lastRecordLSN, count: disk.count, handlesKnown: false)
            }
            s.lastSequence = max(s.lastSequence, recovery.state.lastRecordLSN)
            s.settledSequence = recovery.state.settled
            return settleIfIdle(&s)
        }
        for callback in ready { callback() }
        wake.yield()
    }

    /// Queues a record read back from the journal.
    private func requeue(_ s: inout State, _ p: JournalState.Pending, now: UInt64) {
        if case .artifact(_, let spool) = p.record, access(spool, F_OK) != 0 { return }  // already stored
        // A sync's records from before a restart are not sent again: the next sync asks the
        // destination what it holds and sends the rest, so nothing lands twice.
        if p.lsn <= s.replayedThrough, RecordOrigin(handle: p.handle) == .sync {
            if case .artifact(_, let spool) = p.record { unlink(spool) }
            return
        }
        if case .createRun = p.record, s.scheduler.bindings[p.handle] != nil, !sink.assignsRunIDs { return }
        let completion = s.spill?.completions.removeValue(forKey: p.lsn)
        queue(&s, p.handle, p.record, sequence: p.lsn, bytes: BatchLimits.memoryFootprint(p.record), now: now, mayExist: true, completion: completion)
    }

    /// Whether the journal holds `lsn` on disk (always, without a journal).
    public func isDurable(_ lsn: UInt64) -> Bool {
        guard let journal, lsn > 0 else { return true }
        return journal.isDurable(lsn)
    }

    /// Calls `callback` once the journal holds everything up to `lsn` on disk (at once without a
    /// journal); `urgent` asks for the commit now instead of at the next group commit.
    public func whenDurable(_ lsn: UInt64, urgent: Bool = false, _ callback: @escaping @Sendable () -> Void) {
        guard let journal, lsn > 0 else { return callback() }
        journal.whenDurable(lsn, urgent: urgent, callback)
    }

    /// Looks a run up in the sink (for `attach`), off the caller's thread.
    public func findRun(runID: String, _ body: @escaping @Sendable (StoredRun?) -> Void) {
        let sink = sink
        Task(executorPreference: executor) { body(await sink.findRun(runID: runID)) }
    }

    /// Calls the sink directly, off the caller's thread, for what is not queued per run
    /// (experiment lookups and tags).
    public func callSink<Value: Sendable>(
        _ work: @escaping @Sendable (any RecordSink) async throws(ProtocolError) -> Value,
        _ body: @escaping @Sendable (Result<Value, ProtocolError>) -> Void
    ) {
        let sink = sink
        Task(executorPreference: executor) {
            do throws(ProtocolError) {
                body(.success(try await work(sink)))
            } catch {
                body(.failure(error))
            }
        }
    }

    /// Records queued in memory per run handle (the journal-only backlog is not broken down).
    public var pendingByRun: [String: Int] { state.withLock { $0.scheduler.queuedByRun } }

    /// The sequence number of the last record enqueued.
    public var lastTicket: UInt64 { state.withLock { $0.lastSequence } }

    /// The counters, with the queue figures derived from the state.
    public var counterSnapshot: Counters {
        state.withLock { s in
            var counters = s.counters
            counters.spilledRecords = s.spill?.count ?? 0
            counters.pendingRecords = s.scheduler.queuedEntries + counters.spilledRecords
            return counters
        }
    }

    /// Calls `callback` once every record up to sequence number `ticket` is settled; asks the
    /// scheduler not to wait for fuller batches meanwhile.
    public func whenSettled(upTo ticket: UInt64, _ callback: @escaping @Sendable () -> Void) {
        let now = state.withLock { s -> Bool in
            if s.settledSequence >= ticket { return true }
            let last = s.queued.lastTicket(upTo: ticket) ?? s.scheduler.lastTicket
            s.scheduler.hurry(upTo: s.spill == nil ? last : s.scheduler.lastTicket)
            s.waiters.append((ticket, callback))
            return false
        }
        if now { callback() } else { wake.yield() }
    }

    /// Whether producers of `uid` (nil: any) should pause now.
    public func isOverloaded(uid: UInt32? = nil) -> Bool {
        state.withLock { s in isOverloaded(s, uid: uid, resuming: false) }
    }

    /// Fair shares (docs/architecture.md, "Backpressure"): without a journal, past the queue's
    /// high-water mark. With one, a uid pauses past its share of the backlog bound while another
    /// uid's records wait too; past the bound itself, those over their share (or alone) pause,
    /// never one under its share. `resuming`: whether paused producers may go on (below half
    /// the high-water mark; below three quarters of the bound and the share).
    private func isOverloaded(_ s: State, uid: UInt32?, resuming: Bool) -> Bool {
        guard journal != nil else { return s.scheduler.queuedEntries > (resuming ? bounds.highWater / 2 : bounds.highWater) }
        let bound = resuming ? 0.75 : 1
        let mine = uid.flatMap { s.bytesByUID[$0] } ?? 0
        let othersWait = uid.map { uid in s.bytesByUID.contains { $0.key != uid && $0.value > 0 } } ?? true
        let overShare = uid != nil && Double(mine) > Double(bounds.userShareBytes) * bound
        if overShare && othersWait { return true }
        return Double(s.journalBytes) > Double(bounds.maxBacklogBytes) * bound && (overShare || !othersWait || uid == nil)
    }

    /// Calls `callback` once producers of `uid` may go on: the queue back under half its
    /// high-water mark, or the journal (and the user's share) back under three quarters.
    public func whenDrained(uid: UInt32? = nil, _ callback: @escaping @Sendable () -> Void) {
        let now = state.withLock { s -> Bool in
            if isDrained(&s, uid: uid) { return true }
            s.drainedCallbacks.append((uid, callback))
            return false
        }
        if now { callback() }
    }

    private func isDrained(_ s: inout State, uid: UInt32?) -> Bool {
        if let journal { s.journalBytes = journal.diskBytes }
        return !isOverloaded(s, uid: uid, resuming: true)
    }

    /// Runs the drained callbacks of producers that may go on (after the journal shrank).
    private func checkDrained() {
        let ready = state.withLock { s in takeDrained(&s) }
        for callback in ready { callback() }
    }

    private func takeDrained(_ s: inout State) -> [@Sendable () -> Void] {
        var ready: [@Sendable () -> Void] = []
        var waiting: [(uid: UInt32?, callback: @Sendable () -> Void)] = []
        if let journal { s.journalBytes = journal.diskBytes }  // once for every waiter
        for waiter in s.drainedCallbacks {
            if isOverloaded(s, uid: waiter.uid, resuming: true) { waiting.append(waiter) } else { ready.append(waiter.callback) }
        }
        s.drainedCallbacks = waiting
        return ready
    }

    /// How many of the records up to sequence number `ticket` are not settled yet.
    public func pending(upTo ticket: UInt64) -> Int {
        state.withLock { s in
            guard ticket > s.settledSequence else { return 0 }
            return s.queued.count(upTo: ticket) + (s.spill.map { ticket >= $0.firstUnloaded ? $0.count : 0 } ?? 0)
        }
    }

    /// Sends what is queued (without batching delays), then stops; waits at most `timeout`
    /// seconds, and not at all while the server refuses the credentials. Returns the number of
    /// records left unsent (they stay in the journal).
    public func shutdown(timeout: Double) async -> Int {
        state.withLock { $0.stopping = true }
        wake.yield()
        let deadline = Self.monotonicNs() + UInt64(timeout * 1e9)
        while Self.monotonicNs() < deadline {
            // A server that refuses the credentials takes nothing: the journal keeps it all.
            if state.withLock({ $0.stopped || $0.counters.needsCredentials != nil }) { break }
            try? await Task.sleep(for: .milliseconds(20))
        }
        state.withLock { $0.stopped = true }
        wake.finish()
        await sink.close()
        journal?.close()
        try? await group.shutdownGracefully()
        return state.withLock { $0.scheduler.queuedEntries + ($0.spill?.count ?? 0) }
    }

    // MARK: The loop

    private func run() async {
        var iterator = wakes.makeAsyncIterator()
        while true {
            let now = Self.monotonicNs()
            let (batches, wakeAt, done) = state.withLock { s -> ([UploadScheduler.Batch], UInt64?, Bool) in
                if s.stopped { return ([], nil, true) }
                var out: [UploadScheduler.Batch] = []
                while s.scheduler.inFlight < sink.concurrency, let batch = s.scheduler.next(now: now, draining: s.stopping) {
                    out.append(batch)
                }
                if s.stopping && s.scheduler.queuedEntries == 0 && s.scheduler.inFlight == 0 && s.spill == nil {
                    s.stopped = true
                    return (out, nil, true)
                }
                return (out, s.scheduler.nextWake(now: now), false)
            }
            loadSpilled()
            for batch in batches {
                Task(executorPreference: executor) { [self] in
                    let outcome = await sink.perform(batch.operation)
                    finish(batch, outcome)
                }
            }
            if done { return }
            if let wakeAt {
                let delay = wakeAt > now ? wakeAt - now : 0
                let wake = wake
                executor.loop.scheduleTask(in: .nanoseconds(Int64(delay))) { wake.yield() }
            }
            guard await iterator.next() != nil else { return }
        }
    }

    /// Reads spilled records back from the journal once memory has room for them.
    private func loadSpilled() {
        guard let journal else { return }
        let request = state.withLock { s -> (Journal.Position?, UInt64, UInt64)? in
            guard var spill = s.spill, !spill.loading, s.memoryBytes < bounds.memoryBytes / 2 else { return nil }
            spill.loading = true
            s.spill = spill
            return (spill.position, spill.firstUnloaded, spill.lastSpilled)
        }
        guard let (position, first, last) = request else { return }
        let through = min(last, journal.durableSequence)
        let (read, next) =
            through >= first
            // maxBytes counts journal bytes; a record holds ~3.5× its journal size once queued
            // (measured: ~285 bytes for a single metric whose record is ~80), so this reads back
            // about a quarter of the memory bound.
            ? journal.records(from: position, after: first - 1, through: through, maxBytes: bounds.memoryBytes / 16)
            : ([], position)
        let now = Self.monotonicNs()
        let ready = state.withLock { s -> [@Sendable () -> Void] in
            for p in read where s.spill!.takeBack(p.lsn, handle: p.handle) { requeue(&s, p, now: now) }
            s.spill!.loading = false
            s.spill!.position = next
            if let lastRead = read.last?.lsn { s.spill!.firstUnloaded = lastRead + 1 }
            if s.spill!.firstUnloaded > s.spill!.lastSpilled {
                s.spill = nil  // caught up: new records go to memory again
            }
            return settleIfIdle(&s)
        }
        for callback in ready { callback() }
        if read.isEmpty {
            // Not on disk yet: try again once the journal committed it.
            journal.whenDurable(first) { [wake] in wake.yield() }
        } else {
            wake.yield()
        }
    }

    private func finish(_ batch: UploadScheduler.Batch, _ outcome: SinkOutcome) {
        let now = Self.monotonicNs()
        let (callbacks, completions, letters, credentials) = state.withLock { s -> ([@Sendable () -> Void], [(Completion, Result<UploadScheduler.Binding?, ProtocolError>)], [DeadLetter], (wasRefused: Bool, refused: String?)) in
            let settled = s.scheduler.finish(batch, outcome, now: now, jitter: Double.random(in: 0...1))
            if let created = settled.created {
                journal?.append(.bind(handle: batch.handle, runID: created.runID, experimentID: created.experimentID))
            }
            // Memory is given back as each record settles, in any order: runs settle at their own
            // pace, and the journal's watermark (below) waits for the oldest.
            for ticket in settled.tickets { s.memoryBytes -= s.queued.release(ticket) }
            for (ticket, _) in settled.failures { s.memoryBytes -= s.queued.release(ticket) }
            s.memoryBytes -= s.queued.dropSettled(upTo: s.scheduler.settledUpTo)
            // Settled is everything below the oldest record still waiting, in memory or on disk.
            var settledThrough = s.lastSequence
            if let oldest = s.queued.oldestSequence { settledThrough = min(settledThrough, oldest - 1) }
            if let spill = s.spill { settledThrough = min(settledThrough, spill.firstUnloaded - 1) }
            s.settledSequence = max(s.settledSequence, settledThrough)
            if let journal {
                // With nothing left at all, everything journaled so far is settled (binds included).
                journal.settle(upTo: s.queued.isEmpty && s.spill == nil ? journal.appendedLSN : s.settledSequence)
            }
            var completions: [(Completion, Result<UploadScheduler.Binding?, ProtocolError>)] = []
            for ticket in settled.tickets {
                if let c = s.completions.removeValue(forKey: ticket) { completions.append((c, .success(settled.created))) }
            }
            for (ticket, error) in settled.failures {
                if let c = s.completions.removeValue(forKey: ticket) { completions.append((c, .failure(error))) }
            }
            let wallNow = Self.wallMs()
            s.counters.appliedRecords += UInt64(settled.tickets.count)
            s.counters.rejectedRecords += UInt64(settled.failures.count)
            s.counters.deadLetters += UInt64(settled.deadLetters.count)
            s.counters.metricsWritten += UInt64(settled.metrics)
            s.counters.systemMetricsWritten += UInt64(settled.systemMetrics)
            s.counters.writeRate.add(UInt64(settled.metrics), atMs: wallNow)
            let wasRefusingCredentials = s.counters.needsCredentials != nil
            switch outcome {
            case .applied, .created:
                s.counters.lastSuccessMs = wallNow
                s.counters.needsCredentials = nil
            case .needsCredentials(let reason):
                s.counters.needsCredentials = reason
                s.counters.lastError = reason + ": records wait in the journal for working credentials"
                s.counters.lastErrorMs = wallNow
            case .retry(_, let reason):
                s.counters.retries += 1
                s.counters.lastError = reason
                s.counters.lastErrorMs = wallNow
            case .rejected(let refusal):
                s.counters.lastError = refusal.error.message
                s.counters.lastErrorMs = wallNow
            }
            return (takeReady(&s), completions, settled.deadLetters, (wasRefusingCredentials, s.counters.needsCredentials))
        }
        if credentials.wasRefused != (credentials.refused != nil) {  // logged outside the lock
            if let reason = credentials.refused {
                logger.warning("destination needs credentials: records wait in the journal", metadata: ["destination": "\(destination)", "reason": "\(reason)"])
            } else {
                logger.notice("destination accepts the credentials again: uploads resume", metadata: ["destination": "\(destination)"])
            }
        }
        if !letters.isEmpty { keep(letters, toldByCompletion: completions.contains { if case .failure = $0.1 { true } else { false } }) }
        for (completion, result) in completions { completion(result) }
        for callback in callbacks { callback() }
        wake.yield()
    }

    /// Writes refused records to the dead-letter file and tells the run's writer, once per call
    /// (unless a completion of the same call tells it already).
    private func keep(_ letters: [DeadLetter], toldByCompletion: Bool) {
        if let deadLetters {
            deadLetters.append(letters) { [registry] handle in registry?.entry(handle)?.ownerUID ?? getuid() }
        } else {
            for letter in letters { if case .artifact(_, let spool) = letter.record { unlink(spool) } }
        }
        guard !toldByCompletion, let registry, let first = letters.first else { return }
        var error = first.refusal.error
        if case .log(let batch) = first.record {
            error.op = "log"
            let keys = Set(batch.metrics.map(\.key) + batch.params.keys + batch.tags.keys)
            if keys.count == 1 { error.key = keys.first }
        }
        let kept = deadLetters.map { " It is kept in \($0.path): `armoryctl errors` lists it, `armoryctl errors --retry` sends it again once the cause is fixed." } ?? ""
        error.message = "\(destination) refused \(letters.count == 1 ? "a record" : "\(letters.count) records") of this run: \(error.message).\(kept)"
        registry.report(error, toWriterOf: first.handle)
    }

    /// Journal bytes not yet settled, per client uid (what fair shares weigh).
    public var backlogByUID: [UInt32: Int] { state.withLock { $0.bytesByUID } }

    /// Why the server refuses the credentials, while it does (`needs-credentials`).
    public var needsCredentials: String? { state.withLock { $0.counters.needsCredentials } }

    /// The server's base URL (nil for a local store).
    public var serverURL: String? { sink.serverURL }

    /// Replaces the sink's credentials (rotated ones); what waited for them is sent at once.
    /// Returns whether they changed.
    @discardableResult
    public func useCredentials(_ credentials: MLflowCredentials) -> Bool {
        guard sink.useCredentials(credentials) else { return false }
        state.withLock { s in
            s.scheduler.retryNow()
            s.counters.needsCredentials = nil  // until the server refuses these too
        }
        logger.notice("destination has new credentials: uploads resume", metadata: ["destination": "\(destination)"])
        wake.yield()
        return true
    }

    /// Queues dead letters again (`armoryctl errors --retry`), each run under a fresh handle
    /// bound to its run id (a refused creation creates it again); once the journal holds them they
    /// leave the dead-letter file. Those refused again come back as new lines.
    public func retry(_ lines: [DeadLetterLine]) {
        guard let deadLetters, !lines.isEmpty else { return }
        var handles: [String: String] = [:]
        func bound(_ runID: String, owner: UInt32) -> String {
            if let handle = handles[runID] { return handle }
            let handle = "retry-" + RunIDs.newHandle()
            handles[runID] = handle
            // Finished: a restart does not take it for a client's run left running.
            attach(
                RunEntry(
                    handle: handle, runID: runID, experimentID: nil, experimentName: "", name: "", ownerUID: owner, status: .finished,
                    parentHandle: nil, params: [:], connection: nil, clientPID: 0))
            return handle
        }
        var records: [(handle: String, record: SinkRecord, completion: Completion?)] = []
        for line in lines {
            var record = line.record
            let handle: String
            if let runID = line.runID {
                handle = bound(runID, owner: line.uid)
            } else {
                handle = handles["create " + line.handle] ?? "retry-" + RunIDs.newHandle()
                handles["create " + line.handle] = handle
                if case .createRun(var creation) = record {
                    creation.handle = handle
                    creation.parentHandle = line.parentRunID.map { bound($0, owner: line.uid) }
                    record = .createRun(creation)
                }
            }
            records.append((handle, record, nil))
        }
        let lsn = enqueue(records).lsn
        whenDurable(lsn, urgent: true) { deadLetters.remove(lines) }
    }

    /// The callbacks of waiters whose sequence is settled, and of drain waiters once producers
    /// may go on.
    private func takeReady(_ s: inout State) -> [@Sendable () -> Void] {
        var ready: [@Sendable () -> Void] = []
        let settledSequence = s.settledSequence
        while let first = s.owed.first, first.through <= settledSequence {
            s.owed.removeFirst()
            s.bytesByUID[first.uid, default: 0] -= first.bytes
            if s.bytesByUID[first.uid] ?? 0 <= 0 { s.bytesByUID[first.uid] = nil }
        }
        s.waiters.removeAll { waiter in
            guard waiter.sequence <= settledSequence else { return false }
            ready.append(waiter.callback)
            return true
        }
        if !s.drainedCallbacks.isEmpty { ready += takeDrained(&s) }
        return ready
    }

    /// With nothing queued and nothing left on disk, everything journaled is settled (records a
    /// restart dropped, say): records that, and returns who waited for it.
    private func settleIfIdle(_ s: inout State) -> [@Sendable () -> Void] {
        guard s.queued.isEmpty, s.spill == nil else { return [] }
        s.settledSequence = s.lastSequence
        journal?.settle(upTo: s.lastSequence)
        return takeReady(&s)
    }

    static func monotonicNs() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    static func wallMs() -> Int64 { Int64(Date().timeIntervalSince1970 * 1000) }
}
