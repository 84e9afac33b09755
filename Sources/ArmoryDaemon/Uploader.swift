import ArmoryProtocol
import DequeModule
import Foundation

/// Drains records, in the order they were accepted, into the sink on a thread of its own.
///
/// Every record gets a ticket; `whenApplied` tells a `flush wait=uploaded` when everything up to
/// a ticket is settled (applied or rejected). The queue has a high-water mark: past it,
/// producers are told to pause (connections stop reading) until it falls below the low mark.
public final class Uploader: @unchecked Sendable {
    /// The outcome of one record, handed to its completion.
    public typealias Completion = @Sendable (Result<String?, ProtocolError>) -> Void

    private struct Item {
        var ticket: UInt64
        var record: Work
        var completion: Completion?
    }

    private enum Work {
        case record(SinkRecord)
        case query(@Sendable (RecordSink) -> Void)
    }

    /// Counters reported by `armoryctl status`.
    public struct Counters: Sendable, Equatable {
        public var pendingRecords = 0
        public var appliedRecords: UInt64 = 0
        public var metricsWritten: UInt64 = 0
        public var rejectedRecords: UInt64 = 0
        public var lastError: String?
        public var lastErrorMs: Int64?
        public var lastSuccessMs: Int64?

        /// The most recent sink call failed: the store is refusing or unreachable.
        public var isDegraded: Bool {
            guard let lastErrorMs else { return false }
            return lastErrorMs > (lastSuccessMs ?? 0)
        }
    }

    private let condition = NSCondition()
    private var queue = Deque<Item>()
    private var nextTicket: UInt64 = 1
    private var settledTicket: UInt64 = 0
    private var waiters: [(ticket: UInt64, callback: @Sendable () -> Void)] = []
    private var drainedCallbacks: [@Sendable () -> Void] = []
    private var counters = Counters()
    private var stopping = false
    private var thread: Thread?
    private let sink: RecordSink
    public let highWater: Int
    public let lowWater: Int

    public init(sink: RecordSink, highWater: Int = 200_000) {
        self.sink = sink
        self.highWater = highWater
        self.lowWater = highWater / 2
    }

    public var destination: String { sink.destination }

    public func start() {
        let thread = Thread { [self] in run() }
        thread.name = "armoryd-uploader"
        self.thread = thread
        thread.start()
    }

    /// Enqueues a record; returns its ticket and whether the queue is over its high-water mark.
    @discardableResult
    public func enqueue(_ record: SinkRecord, completion: Completion? = nil) -> (ticket: UInt64, overloaded: Bool) {
        enqueue(work: .record(record), completion: completion)
    }

    /// Runs `body` on the uploader thread, in order with the records (for reads of the sink).
    public func query(_ body: @escaping @Sendable (RecordSink) -> Void) {
        _ = enqueue(work: .query(body), completion: nil)
    }

    private func enqueue(work: Work, completion: Completion?) -> (ticket: UInt64, overloaded: Bool) {
        condition.lock()
        defer { condition.unlock() }
        let ticket = nextTicket
        nextTicket += 1
        queue.append(Item(ticket: ticket, record: work, completion: completion))
        counters.pendingRecords = queue.count
        if queue.count == 1 { condition.signal() }
        return (ticket, queue.count > highWater)
    }

    /// The ticket of the last record enqueued so far.
    public var lastTicket: UInt64 {
        condition.lock()
        defer { condition.unlock() }
        return nextTicket - 1
    }

    public var counterSnapshot: Counters {
        condition.lock()
        defer { condition.unlock() }
        return counters
    }

    /// Calls `callback` (on the uploader thread, or at once) when every ticket ≤ `ticket` is settled.
    public func whenSettled(upTo ticket: UInt64, _ callback: @escaping @Sendable () -> Void) {
        condition.lock()
        if settledTicket >= ticket {
            condition.unlock()
            callback()
            return
        }
        waiters.append((ticket, callback))
        condition.unlock()
    }

    /// Calls `callback` once the queue is back under its low-water mark.
    public func whenDrained(_ callback: @escaping @Sendable () -> Void) {
        condition.lock()
        if queue.count <= lowWater {
            condition.unlock()
            callback()
            return
        }
        drainedCallbacks.append(callback)
        condition.unlock()
    }

    /// How many of the records up to `ticket` are not settled yet.
    public func pending(upTo ticket: UInt64) -> Int {
        condition.lock()
        defer { condition.unlock() }
        return ticket > settledTicket ? Int(ticket - settledTicket) : 0
    }

    /// Applies what is queued, then stops the thread; waits at most `timeout` seconds.
    /// Returns the number of records left unapplied.
    public func shutdown(timeout: Double) -> Int {
        condition.lock()
        stopping = true
        condition.broadcast()
        let deadline = Date(timeIntervalSinceNow: timeout)
        while thread != nil, !queue.isEmpty || !stoppedThread {
            if !condition.wait(until: deadline) { break }
        }
        let left = queue.count
        condition.unlock()
        return left
    }

    private var stoppedThread = false

    private func run() {
        var batch: [Item] = []
        while true {
            condition.lock()
            while queue.isEmpty && !stopping { condition.wait() }
            if queue.isEmpty && stopping {
                stoppedThread = true
                condition.broadcast()
                condition.unlock()
                return
            }
            let take = min(queue.count, 4096)
            batch.removeAll(keepingCapacity: true)
            for _ in 0..<take { batch.append(queue.removeFirst()) }
            condition.unlock()

            let outcome = apply(batch)

            condition.lock()
            settledTicket = batch.last!.ticket
            counters.pendingRecords = queue.count
            counters.appliedRecords += UInt64(batch.count - outcome.rejected)
            counters.rejectedRecords += UInt64(outcome.rejected)
            counters.metricsWritten += UInt64(outcome.metrics)
            if let error = outcome.lastError {
                counters.lastError = error
                counters.lastErrorMs = Self.nowMs()
            }
            if outcome.succeeded { counters.lastSuccessMs = Self.nowMs() }
            var ready: [@Sendable () -> Void] = []
            waiters.removeAll { waiter in
                guard waiter.ticket <= settledTicket else { return false }
                ready.append(waiter.callback)
                return true
            }
            if queue.count <= lowWater, !drainedCallbacks.isEmpty {
                ready.append(contentsOf: drainedCallbacks)
                drainedCallbacks.removeAll()
            }
            condition.unlock()
            for callback in ready { callback() }
        }
    }

    /// Applies a batch in order per run. Metric-only logs are gathered per run and written in
    /// one sink call each, just before the next other record of that run (or at the end), so a
    /// run's records keep their order while interleaved clients still get large writes.
    private func apply(_ batch: [Item]) -> (rejected: Int, metrics: Int, lastError: String?, succeeded: Bool) {
        var succeeded = false
        var rejected = 0
        var metrics = 0
        var lastError: String?
        var gathered: [String: (metrics: [MetricPoint], records: Int)] = [:]
        var gatherOrder: [String] = []

        func writeGathered(_ runID: String) {
            guard let pending = gathered.removeValue(forKey: runID) else { return }
            do {
                try sink.log(runID: runID, batch: LogBatch(metrics: pending.metrics))
                metrics += pending.metrics.count
                succeeded = true
            } catch {
                rejected += pending.records
                lastError = error.description
            }
        }

        for item in batch {
            switch item.record {
            case .query(let body):
                for runID in gatherOrder { writeGathered(runID) }
                gatherOrder.removeAll()
                body(sink)
            case .record(let record):
                if case .log(let runID, let b) = record, b.params.isEmpty, b.tags.isEmpty, item.completion == nil {
                    if gathered[runID] == nil {
                        gathered[runID] = ([], 0)
                        gatherOrder.append(runID)
                    }
                    gathered[runID]!.metrics.append(contentsOf: b.metrics)
                    gathered[runID]!.records += 1
                    continue
                }
                if let runID = record.runID { writeGathered(runID) }
                let result: Result<String?, ProtocolError>
                do {
                    switch record {
                    case .createRun(let creation): result = .success(try sink.createRun(creation))
                    case .log(let runID, let b): try sink.log(runID: runID, batch: b); result = .success(nil)
                    case .updateRun(let runID, let status, let endTime): try sink.updateRun(runID: runID, status: status, endTime: endTime); result = .success(nil)
                    case .artifact(let runID, let path, let spoolPath): try sink.storeArtifact(runID: runID, path: path, spoolPath: spoolPath); result = .success(nil)
                    }
                    metrics += record.metricCount
                    succeeded = true
                } catch {
                    result = .failure(error)
                    rejected += 1
                    lastError = error.description
                }
                item.completion?(result)
            }
        }
        for runID in gatherOrder { writeGathered(runID) }
        return (rejected, metrics, lastError, succeeded)
    }

    static func nowMs() -> Int64 { Int64(Date().timeIntervalSince1970 * 1000) }
}
