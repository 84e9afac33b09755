#if canImport(Glibc)
import Glibc
#endif
import ArmoryProtocol
import Foundation
import NIOCore
import NIOPosix
import Synchronization

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
/// Every record gets a ticket; `whenSettled` tells a `flush wait=uploaded` when everything up to
/// a ticket is settled (applied or refused). Past the high-water mark, producers are told to
/// pause (connections stop reading) until the queue falls below the low mark.
public final class Uploader: Sendable {
    /// A record's outcome: its run's binding when it created one, or the refusal.
    public typealias Completion = @Sendable (Result<UploadScheduler.Binding?, ProtocolError>) -> Void

    /// Counters reported by `armoryctl status`.
    public struct Counters: Sendable, Equatable {
        public var pendingRecords = 0
        public var appliedRecords: UInt64 = 0
        public var metricsWritten: UInt64 = 0
        public var rejectedRecords: UInt64 = 0
        public var retries: UInt64 = 0
        public var lastError: String?
        public var lastErrorMs: Int64?
        public var lastSuccessMs: Int64?

        /// The most recent sink call failed: the store is refusing or unreachable.
        public var isDegraded: Bool {
            guard let lastErrorMs else { return false }
            return lastErrorMs > (lastSuccessMs ?? 0)
        }
    }

    private struct State: Sendable {
        var scheduler: UploadScheduler
        var completions: [UInt64: Completion] = [:]
        var waiters: [(ticket: UInt64, callback: @Sendable () -> Void)] = []
        var drainedCallbacks: [@Sendable () -> Void] = []
        var counters = Counters()
        var stopping = false
        var stopped = false
    }

    private let state: Mutex<State>
    private let sink: any RecordSink
    private let wake: AsyncStream<Void>.Continuation
    private let wakes: AsyncStream<Void>
    private let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    private let executor: EventLoopTaskExecutor
    public let highWater: Int
    public let lowWater: Int

    public init(sink: any RecordSink, highWater: Int = 200_000, flushInterval: Double? = nil) {
        self.sink = sink
        self.highWater = highWater
        self.lowWater = highWater / 2
        let interval = flushInterval ?? sink.defaultFlushInterval
        state = Mutex(State(scheduler: UploadScheduler(limits: sink.limits, flushIntervalNs: UInt64(max(0, interval) * 1e9))))
        (wakes, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        executor = EventLoopTaskExecutor(loop: group.next())
    }

    public var destination: String { sink.destination }
    /// Whether the sink takes run ids assigned by the daemon (the local store does).
    public var assignsRunIDs: Bool { sink.assignsRunIDs }

    public func start() {
        Task(executorPreference: executor) { [self] in await run() }
    }

    // MARK: Producers

    /// Enqueues a record of run `handle`; returns its (last) ticket and whether the queue is over
    /// its high-water mark.
    @discardableResult
    public func enqueue(_ handle: String, _ record: SinkRecord, completion: Completion? = nil) -> (ticket: UInt64, overloaded: Bool) {
        let now = Self.monotonicNs()
        let result = state.withLock { s -> (UInt64, Bool) in
            let ticket = s.scheduler.enqueue(handle, record, now: now)
            if let completion { s.completions[ticket] = completion }
            s.counters.pendingRecords = s.scheduler.queuedEntries
            return (ticket, s.scheduler.queuedEntries > highWater)
        }
        wake.yield()
        return result
    }

    /// A run that already exists in MLflow (attached): its records need no create.
    public func bind(_ handle: String, runID: String, experimentID: String?) {
        state.withLock { $0.scheduler.bind(handle, .init(runID: runID, experimentID: experimentID)) }
    }

    /// Looks a run up in the sink (for `attach`), off the caller's thread.
    public func findRun(runID: String, _ body: @escaping @Sendable (StoredRun?) -> Void) {
        let sink = sink
        Task(executorPreference: executor) { body(await sink.findRun(runID: runID)) }
    }

    /// Looks an experiment up (or creates it) in the sink, off the caller's thread.
    public func experiment(named name: String, create: Bool, _ body: @escaping @Sendable (Result<String?, ProtocolError>) -> Void) {
        let sink = sink
        Task(executorPreference: executor) {
            do throws(ProtocolError) {
                body(.success(try await sink.experiment(named: name, create: create)))
            } catch {
                body(.failure(error))
            }
        }
    }

    public var lastTicket: UInt64 { state.withLock { $0.scheduler.lastTicket } }

    public var counterSnapshot: Counters { state.withLock { $0.counters } }

    /// Calls `callback` once every ticket ≤ `ticket` is settled; asks the scheduler not to wait
    /// for fuller batches meanwhile.
    public func whenSettled(upTo ticket: UInt64, _ callback: @escaping @Sendable () -> Void) {
        let now = state.withLock { s -> Bool in
            if s.scheduler.settledUpTo >= ticket { return true }
            s.scheduler.hurry(upTo: ticket)
            s.waiters.append((ticket, callback))
            return false
        }
        if now { callback() } else { wake.yield() }
    }

    /// Calls `callback` once the queue is back under its low-water mark.
    public func whenDrained(_ callback: @escaping @Sendable () -> Void) {
        let now = state.withLock { s -> Bool in
            if s.scheduler.queuedEntries <= lowWater { return true }
            s.drainedCallbacks.append(callback)
            return false
        }
        if now { callback() }
    }

    /// How many of the records up to `ticket` are not settled yet.
    public func pending(upTo ticket: UInt64) -> Int {
        state.withLock { s in
            let settled = s.scheduler.settledUpTo
            return ticket > settled ? min(Int(ticket - settled), s.scheduler.queuedEntries) : 0
        }
    }

    /// Sends what is queued (without batching delays), then stops; waits at most `timeout`
    /// seconds. Returns the number of records left unsent.
    public func shutdown(timeout: Double) async -> Int {
        state.withLock { $0.stopping = true }
        wake.yield()
        let deadline = Self.monotonicNs() + UInt64(timeout * 1e9)
        while Self.monotonicNs() < deadline {
            if state.withLock({ $0.stopped }) { break }
            try? await Task.sleep(for: .milliseconds(20))
        }
        state.withLock { $0.stopped = true }
        wake.finish()
        await sink.close()
        try? await group.shutdownGracefully()
        return state.withLock { $0.scheduler.queuedEntries }
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
                if s.stopping && s.scheduler.queuedEntries == 0 && s.scheduler.inFlight == 0 {
                    s.stopped = true
                    return (out, nil, true)
                }
                return (out, s.scheduler.nextWake(now: now), false)
            }
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

    private func finish(_ batch: UploadScheduler.Batch, _ outcome: SinkOutcome) {
        let now = Self.monotonicNs()
        let (callbacks, completions) = state.withLock { s -> ([@Sendable () -> Void], [(Completion, Result<UploadScheduler.Binding?, ProtocolError>)]) in
            let settled = s.scheduler.finish(batch, outcome, now: now, jitter: Double.random(in: 0...1))
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
            s.counters.metricsWritten += UInt64(settled.metrics)
            s.counters.pendingRecords = s.scheduler.queuedEntries
            switch outcome {
            case .applied, .created: s.counters.lastSuccessMs = wallNow
            case .retry(_, let reason):
                s.counters.retries += 1
                s.counters.lastError = reason
                s.counters.lastErrorMs = wallNow
            case .rejected(let error):
                s.counters.lastError = error.message
                s.counters.lastErrorMs = wallNow
            }
            var ready: [@Sendable () -> Void] = []
            let settledUpTo = s.scheduler.settledUpTo
            s.waiters.removeAll { waiter in
                guard waiter.ticket <= settledUpTo else { return false }
                ready.append(waiter.callback)
                return true
            }
            if s.scheduler.queuedEntries <= lowWater, !s.drainedCallbacks.isEmpty {
                ready.append(contentsOf: s.drainedCallbacks)
                s.drainedCallbacks.removeAll()
            }
            return (ready, completions)
        }
        for (completion, result) in completions { completion(result) }
        for callback in callbacks { callback() }
        wake.yield()
    }

    static func monotonicNs() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    static func wallMs() -> Int64 { Int64(Date().timeIntervalSince1970 * 1000) }
}
