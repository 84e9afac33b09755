import ArmoryProtocol
import Foundation
import Logging
import MLflow
import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Runs tasks on one NIO event loop thread: the sender's own, so that neither blocking file
/// writes nor a busy cooperative pool can stall the other.
final class EventLoopTaskExecutor: TaskExecutor {
    let loop: any EventLoop

    init(loop: any EventLoop) { self.loop = loop }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        loop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}

/// A destination's sender (docs/architecture.md, "The pipeline"): takes what the journal writer
/// journaled from its inbox, and sends it to the sink as its `SenderStateMachine` decides (memory
/// first, then what waits in the journal, read back as memory frees up), on a task of its own
/// event loop that keeps up to `sink.concurrency` calls in flight. It tells the journal what is
/// settled, records each created run's binding there, keeps refused records as dead letters, and
/// answers who waits for a record's outcome or for the upload.
final class Sender: Sendable {
    /// What the writer handed over and the sender has not taken yet: its appends' records in
    /// journal order (one array per append, handed over as is), who waits for a record's outcome
    /// (few records have someone), and the last entry appended with them.
    private struct Inbox {
        var bursts: [[JournaledRecord]] = []
        var completions: [(sequence: UInt64, completion: RecordCompletion)] = []
        var appendedThrough: UInt64 = 0
    }

    private typealias Waiter = (sequence: UInt64, runs: Set<String>?, callback: @Sendable () -> Void)

    private struct State {
        var machine: SenderStateMachine
        /// Who waits for a record's outcome, by sequence number.
        var completions: [UInt64: RecordCompletion] = [:]
        /// Who waits for everything up to a sequence number to be settled (of some runs only,
        /// when `runs` says which).
        var waiters: [Waiter] = []
    }

    private let inbox = Mutex(Inbox())
    private let state: Mutex<State>
    let sink: any RecordSink
    private let journal: Journal
    /// Where refused records are kept (`nil`: they are counted and reported, then dropped).
    let deadLetters: DeadLetterFile?
    /// Who owns each run (for the dead-letter file) and how to tell its writer about a refusal.
    private let registry: RunRegistry?
    private let wake: AsyncStream<Void>.Continuation
    private let wakes: AsyncStream<Void>
    private let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let executor: EventLoopTaskExecutor
    private let logger = Logger(label: "armoryd")

    init(sink: any RecordSink, journal: Journal, memoryBound: Int, flushInterval: Double, deadLetters: DeadLetterFile?, registry: RunRegistry?) {
        self.sink = sink
        self.journal = journal
        self.deadLetters = deadLetters
        self.registry = registry
        let machine = SenderStateMachine(
            limits: sink.limits, flushIntervalNs: UInt64(max(0, flushInterval) * 1e9), memoryBound: memoryBound, assignsRunIDs: sink.assignsRunIDs,
            artifactLanes: sink.concurrency, recordIntervalNs: UInt64(max(0, journal.options.settleInterval) * 1e9))
        state = Mutex(State(machine: machine))
        (wakes, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        executor = EventLoopTaskExecutor(loop: group.next())
    }

    func start() {
        Task(executorPreference: executor) { [self] in await run() }
    }

    // MARK: From the writer

    /// Takes records the writer journaled (called under the writer's lock, so in journal order);
    /// `appendedThrough`: the last entry it appended with them.
    func receive(_ records: [JournaledRecord], completions: [(sequence: UInt64, completion: RecordCompletion)], appendedThrough: UInt64) {
        inbox.withLock { inbox in
            if !records.isEmpty { inbox.bursts.append(records) }
            if !completions.isEmpty { inbox.completions += completions }
            inbox.appendedThrough = appendedThrough
        }
        if !records.isEmpty { wake.yield() }
    }

    /// Runs `body` on the state after taking what waits in the inbox.
    private func withState<Result>(_ body: (inout State) -> Result) -> Result {
        state.withLock { s in
            var taken = Inbox()
            inbox.withLock { inbox in
                swap(&taken.bursts, &inbox.bursts)
                swap(&taken.completions, &inbox.completions)
                taken.appendedThrough = inbox.appendedThrough
            }
            if taken.appendedThrough > 0 {
                for (sequence, completion) in taken.completions { s.completions[sequence] = completion }
                let now = taken.bursts.isEmpty ? 0 : MonotonicClock.nowNs()
                s.machine.receive(taken.bursts.joined(), appendedThrough: taken.appendedThrough, now: now)
            }
            return body(&s)
        }
    }

    // MARK: Questions and waits

    /// A handle's run at the destination, once created. Set under the same lock as the settled
    /// watermark, so a waiter told "settled" finds it (the registry learns it a moment later).
    func binding(of handle: String) -> UploadScheduler.Binding? {
        state.withLock { $0.machine.scheduler.bindings[handle] }
    }

    /// A run that already exists at the destination: its records need no creation.
    func bind(_ handle: String, _ binding: UploadScheduler.Binding) {
        state.withLock { $0.machine.bind(handle, binding) }
    }

    /// Calls `callback` once every record up to sequence number `sequence` is settled (of
    /// `runs` only, unless nil); asks for them to be sent without waiting for fuller batches
    /// meanwhile.
    func whenSettled(upTo sequence: UInt64, runs: Set<String>?, _ callback: @escaping @Sendable () -> Void) {
        let now = withState { s -> Bool in
            if s.machine.hurry(upTo: sequence) { return true }
            if let runs, s.machine.isSettled(upTo: sequence, runs: runs) { return true }
            s.waiters.append((sequence, runs, callback))
            return false
        }
        if now { callback() } else { wake.yield() }
    }

    /// How many of the records up to sequence number `sequence` are not settled yet.
    func pending(upTo sequence: UInt64) -> Int {
        withState { $0.machine.pending(upTo: sequence) }
    }

    /// Records queued in memory per run handle (the journal-only backlog is not broken down).
    var pendingByRun: [String: Int] { withState { $0.machine.scheduler.queuedByRun } }

    var counters: UploadCounters { withState { $0.machine.counterSnapshot } }

    /// Why the server refuses the credentials, while it does.
    var needsCredentials: String? { state.withLock { $0.machine.counters.needsCredentials } }

    /// Runs a no-op on the sender's event loop under its state lock, then `done` (what the
    /// watchdog's health check waits for: a sink call that blocks the loop holds it back).
    func checkResponsive(_ done: @escaping @Sendable () -> Void) {
        executor.loop.execute { [self] in
            state.withLock { _ in }
            done()
        }
    }

    /// New credentials: what waited for them is sent at once.
    func credentialsReplaced() {
        state.withLock { $0.machine.credentialsReplaced() }
        wake.yield()
    }

    // MARK: Restart

    /// Queues again what the journal holds unsettled after a restart.
    func replay(_ recovery: Journal.Recovery) {
        let recovered = recovery.state
        sink.replaying(runIDs: Set(recovered.runs.values.compactMap(\.runID)))
        let missing = Self.missingSpools(recovered.unsettled)
        let settlement = state.withLock { $0.machine.replay(recovered, missingSpools: missing, now: MonotonicClock.nowNs()) }
        carryOut(settlement)
        wake.yield()  // the loop may be waiting already: what was replayed goes now
    }

    /// Artifact records whose spool file is gone: the file was stored before the restart.
    private static func missingSpools(_ records: [JournalState.Pending]) -> Set<UInt64> {
        var missing = Set<UInt64>()
        for p in records {
            if case .artifact(_, let spool) = p.record, access(spool, F_OK) != 0 { missing.insert(p.lsn) }
        }
        return missing
    }

    // MARK: The loop

    private func run() async {
        var iterator = wakes.makeAsyncIterator()
        while true {
            let now = MonotonicClock.nowNs()
            let (batches, wakeAt, done) = withState { $0.machine.nextBatches(now: now, concurrency: sink.concurrency) }
            recordSettled(now: now)
            readBack()
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

    /// Records the settled watermark in the journal when due, after the sink made what it wrote
    /// durable (so a restart that skips a record finds it at the destination).
    private func recordSettled(now: UInt64, atOnce: Bool = false) {
        guard let settled = state.withLock({ $0.machine.recordDue(now: now, atOnce: atOnce) }) else { return }
        sink.persist()
        journal.recordSettled(upTo: settled)
    }

    /// Reads spilled records back from the journal once memory has room for them.
    private func readBack() {
        guard let (request, maxBytes) = state.withLock({ s in s.machine.readBack().map { ($0, s.machine.readBackBytes) } }) else { return }
        let through = min(request.last, journal.durableSequence)
        let (read, next) =
            through >= request.first
            ? journal.records(from: request.position, after: request.first - 1, through: through, maxBytes: maxBytes)
            : ([], request.position)
        let missing = Self.missingSpools(read)
        let settlement = state.withLock { $0.machine.readBack(read, next: next, missingSpools: missing, now: MonotonicClock.nowNs()) }
        carryOut(settlement)
        if read.isEmpty {
            // Not on disk yet: try again once the journal committed it.
            journal.whenDurable(request.first) { [wake] in wake.yield() }
        } else {
            wake.yield()
        }
    }

    private func finish(_ batch: UploadScheduler.Batch, _ outcome: SinkOutcome) {
        let now = MonotonicClock.nowNs()
        let settlement = state.withLock { $0.machine.finish(batch, outcome, now: now, wallMs: WallClock.nowMs(), jitter: Double.random(in: 0...1)) }
        let (refused, changed) = settlement.credentialsChanged
        if changed {
            if let reason = refused {
                logger.warning("destination needs credentials: records wait in the journal", metadata: ["destination": "\(sink.destination)", "reason": "\(reason)"])
            } else {
                logger.notice("destination accepts the credentials again: uploads resume", metadata: ["destination": "\(sink.destination)"])
            }
        }
        carryOut(settlement)
        wake.yield()
    }

    /// Carries out what the machine decided: the binding and the watermark into the journal (in
    /// that order: a restart that finds the watermark finds the binding), the dead letters, the
    /// outcomes to who waits for them.
    private func carryOut(_ settlement: SenderStateMachine.Settlement) {
        if let (handle, binding) = settlement.created {
            _ = journal.append(.bind(handle: handle, runID: binding.runID, experimentID: binding.experimentID))
        }
        if let settled = settlement.journalSettled { journal.settle(upTo: settled) }
        for spool in settlement.unlink { unlink(spool) }
        let (completions, ready) = state.withLock { s -> ([(RecordCompletion, Result<UploadScheduler.Binding?, ProtocolError>)], [@Sendable () -> Void]) in
            var completions: [(RecordCompletion, Result<UploadScheduler.Binding?, ProtocolError>)] = []
            if !s.completions.isEmpty {
                for (sequence, result) in settlement.outcomes {
                    if let c = s.completions.removeValue(forKey: sequence) { completions.append((c, result)) }
                }
            }
            var ready: [@Sendable () -> Void] = []
            if !s.waiters.isEmpty {
                var waiting: [Waiter] = []
                swap(&waiting, &s.waiters)  // checked against the machine, which stays in place
                waiting.removeAll { waiter in
                    guard waiter.sequence <= s.machine.settledSequence || waiter.runs.map({ s.machine.isSettled(upTo: waiter.sequence, runs: $0) }) == true
                    else { return false }
                    ready.append(waiter.callback)
                    return true
                }
                s.waiters = waiting
            }
            return (completions, ready)
        }
        if !settlement.deadLetters.isEmpty {
            keep(settlement.deadLetters, toldByCompletion: completions.contains { if case .failure = $0.1 { true } else { false } })
        }
        for (completion, result) in completions { completion(result) }
        for callback in ready { callback() }
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
        error.message = "\(sink.destination) refused \(letters.count == 1 ? "a record" : "\(letters.count) records") of this run: \(error.message).\(kept)"
        registry.report(error, toWriterOf: first.handle)
    }

    // MARK: Stopping

    /// Sends what is queued (without batching delays), then stops; waits at most `timeout`
    /// seconds, and not at all while the server refuses the credentials. Returns the number of
    /// records left unsent (they stay in the journal).
    func shutdown(timeout: Double) async -> Int {
        withState { $0.machine.stop() }
        wake.yield()
        let deadline = MonotonicClock.nowNs() + UInt64(timeout * 1e9)
        while MonotonicClock.nowNs() < deadline {
            // A server that refuses the credentials takes nothing: the journal keeps it all.
            if state.withLock({ $0.machine.stopped || $0.machine.counters.needsCredentials != nil }) { break }
            try? await EventLoopClock.sleep(for: .milliseconds(20))
        }
        state.withLock { $0.machine.halt() }
        wake.finish()
        recordSettled(now: MonotonicClock.nowNs(), atOnce: true)
        await sink.close()
        try? await group.shutdownGracefully()
        return state.withLock { $0.machine.unsent }
    }
}
