import ArmoryProtocol
import DequeModule
import HeapModule

/// How large one sink call may be (MLflow's `log-batch` limits for the REST sink).
public struct BatchLimits: Sendable, Equatable {
    public var metrics: Int
    public var params: Int
    public var tags: Int
    public var entities: Int
    public var bytes: Int

    /// MLflow's documented `runs/log-batch` limits (bytes kept under 1 MB with headroom).
    public static let mlflow = BatchLimits(metrics: 1000, params: 100, tags: 100, entities: 1000, bytes: 900_000)
    /// A local store has no request to keep small: large writes, bounded only to cap memory.
    public static let localStore = BatchLimits(metrics: 50_000, params: 10_000, tags: 10_000, entities: 70_000, bytes: 64 << 20)

    /// Splits a batch into pieces that each fit.
    public func split(_ batch: LogBatch) -> [LogBatch] {
        if fits(batch) { return [batch] }
        var pieces: [LogBatch] = []
        var current = LogBatch()
        var bytes = 0
        func room(_ extraBytes: Int) -> Bool {
            current.metrics.count + current.params.count + current.tags.count < entities && bytes + extraBytes <= self.bytes
        }
        func cut() {
            if !current.isEmpty { pieces.append(current) }
            current = LogBatch()
            bytes = 0
        }
        for (k, v) in batch.params {
            let size = Self.estimate(k, v)
            if current.params.count >= params || !room(size) { cut() }
            current.params[k] = v
            bytes += size
        }
        for (k, v) in batch.tags {
            let size = Self.estimate(k, v)
            if current.tags.count >= tags || !room(size) { cut() }
            current.tags[k] = v
            bytes += size
        }
        for m in batch.metrics {
            let size = Self.estimate(m)
            if current.metrics.count >= metrics || !room(size) { cut() }
            current.metrics.append(m)
            bytes += size
        }
        cut()
        return pieces
    }

    public func fits(_ b: LogBatch) -> Bool {
        b.metrics.count <= metrics && b.params.count <= params && b.tags.count <= tags
            && b.metrics.count + b.params.count + b.tags.count <= entities && Self.estimate(b) <= bytes
    }

    /// An upper estimate of a batch's JSON size in a `log-batch` body.
    static func estimate(_ b: LogBatch) -> Int {
        b.metrics.reduce(0) { $0 + estimate($1) } + b.params.reduce(0) { $0 + estimate($1.key, $1.value) } + b.tags.reduce(0) { $0 + estimate($1.key, $1.value) }
    }
    /// An upper estimate of a record's size in memory.
    static func estimate(_ r: SinkRecord) -> Int {
        switch r {
        case .log(let b): estimate(b)
        case .createRun(let c): c.tags.reduce(200) { $0 + estimate($1.key, $1.value) }
        case .updateRun: 64
        case .artifact(let path, let spool): 64 + path.utf8.count + spool.utf8.count
        case .deleteTag(let key): 64 + key.utf8.count
        }
    }
    static func estimate(_ m: MetricPoint) -> Int { m.key.utf8.count * 2 + 90 }
    /// What a queued record holds in memory: its content plus the queues' own entries for it and
    /// the allocations around it (a 64-client ingest peaked at ~270 bytes per queued single-metric
    /// record when only the journal size, ~80 bytes, was counted).
    static func memoryFootprint(_ r: SinkRecord) -> Int { estimate(r) + 192 }
    static func estimate(_ k: String, _ v: String) -> Int { (k.utf8.count + v.utf8.count) * 2 + 30 }
}

/// One ordered unit of work for a run, as the session enqueues it.
public enum SinkRecord: Sendable, Equatable {
    case createRun(RunCreation)
    case log(LogBatch)
    case updateRun(status: RunStatus, endTime: Int64?)
    case artifact(path: String, spoolPath: String)
    /// MLflow's `delete_tag`: ordered after the tag writes before it.
    case deleteTag(key: String)

    var metricCount: Int { if case .log(let b) = self { b.metrics.count } else { 0 } }

    /// Its `system/…` metrics: host metrics, sampled by the daemon or by a client's own monitor
    /// (a batch holds them only when it starts with one: the sampler's batches are all of them).
    var systemMetricCount: Int {
        guard case .log(let b) = self, let first = b.metrics.first, first.key.hasPrefix("system/") else { return 0 }
        return b.metrics.reduce(0) { $0 + ($1.key.hasPrefix("system/") ? 1 : 0) }
    }
}

/// What the sink is asked to do: records with their run's MLflow id filled in.
public enum SinkOperation: Sendable, Equatable {
    /// `attempt` > 0 means an earlier try may have created it: look for `armory.handle` first.
    case createRun(RunCreation, parentRunID: String?, attempt: Int)
    case log(runID: String, LogBatch)
    case updateRun(runID: String, status: RunStatus, endTime: Int64?)
    case artifact(runID: String, path: String, spoolPath: String)
    case deleteTag(runID: String, key: String)
}

/// How a sink call ended.
public enum SinkOutcome: Sendable, Equatable {
    case applied
    case created(runID: String, experimentID: String)
    /// Try again later (`after`: the server's Retry-After, in seconds).
    case retry(after: Double?, reason: String)
    /// The server refuses the credentials (401, 403): the records wait for working ones, retried
    /// with backoff and at once when new credentials arrive (`retryNow`).
    case needsCredentials(reason: String)
    /// Permanently refused: split down to what was refused, which becomes a dead letter.
    case rejected(SinkRefusal)
}

/// Why a sink refused a call, as the dead-letter file records it.
public struct SinkRefusal: Sendable, Equatable {
    public var error: ProtocolError
    /// The server's HTTP status and MLflow error code (none for the local store).
    public var httpStatus: Int?
    public var serverCode: String?
    /// The whole run is refused (deleted, gone), not one entity of the batch: splitting the
    /// batch would only refuse every piece.
    public var refusesRun: Bool

    public init(_ error: ProtocolError, httpStatus: Int? = nil, serverCode: String? = nil, refusesRun: Bool = false) {
        self.error = error
        self.httpStatus = httpStatus
        self.serverCode = serverCode
        self.refusesRun = refusesRun
    }
}

/// A record the sink refused for good: settled for the journal, kept in the destination's
/// dead-letter file until `armoryctl errors --retry` sends it again.
public struct DeadLetter: Sendable, Equatable {
    public var handle: String
    public var record: SinkRecord
    public var refusal: SinkRefusal
    /// The run's id at the destination (nil when the refused record is its creation).
    public var runID: String?
    /// The parent's run id, for a refused creation of a nested run.
    public var parentRunID: String?
}

/// The uploader's brain: per-run ordered queues, batches cut at the sink's limits, runs served
/// round-robin, one call in flight per run, exponential backoff with jitter and Retry-After, and
/// refused batches split until only the refused entities are left (dead letters). A value type driven by the `Uploader`
/// and tested without a sink.
public struct UploadScheduler: Sendable {
    /// One enqueued record.
    public struct Entry: Sendable {
        public var ticket: UInt64
        public var record: SinkRecord
        public var enqueuedAt: UInt64
    }

    /// What to send next: the entries it covers and the operation for the sink.
    public struct Batch: Sendable {
        public var handle: String
        public var entries: [Entry]
        public var operation: SinkOperation
    }

    /// A run's MLflow identity once it exists.
    public struct Binding: Sendable, Equatable {
        public var runID: String
        public var experimentID: String?
    }

    /// What settling a batch produced, for the executor to report.
    public struct Settled: Sendable {
        public var tickets: [UInt64] = []
        public var failures: [(ticket: UInt64, error: ProtocolError)] = []
        public var created: Binding?
        /// What was refused for good, down to the refused entities of a log batch.
        public var deadLetters: [DeadLetter] = []
        public var metrics = 0
        /// Of `metrics`, those named `system/…`.
        public var systemMetrics = 0
    }

    struct RunQueue: Sendable {
        var entries = Deque<Entry>()
        /// A call other than an artifact's is in flight (one at a time, in order).
        var busy = false
        /// Artifacts in flight, by ticket: whole files, independent of each other, so several go
        /// at once (up to `artifactLanes`), ahead of whatever follows them.
        var artifactsInFlight: [UInt64: Entry] = [:]
        /// Whether the run is in `order` (waiting for its turn).
        var listed = false
        var notBefore: UInt64 = 0
        var attempt = 0
        /// A refused log batch being split: its head entries and the pieces still to send.
        var split: Split?
        var parent: String?
        var failed: ProtocolError?
        /// Replayed after a restart: a create may already have reached the sink.
        var mayExist = false
    }

    /// A refused log batch (one or more head entries) sent again piece by piece; the entries
    /// settle once every piece has landed or been refused.
    struct Split: Sendable {
        var entries: [Entry]
        var pieces: Deque<LogBatch>
        var refused: ProtocolError?
    }

    public let limits: BatchLimits
    /// Artifacts of one run in flight at once.
    public let artifactLanes: Int
    /// Log records wait at most this long for more to join their batch (0: send at once).
    public let flushIntervalNs: UInt64
    public let backoffBaseNs: UInt64
    public let backoffCapNs: UInt64

    private var queues: [String: RunQueue] = [:]
    private var order = Deque<String>()
    public private(set) var bindings: [String: Binding] = [:]
    private var unsettled = Heap<UInt64>()
    private var settledOutOfOrder = Set<UInt64>()
    private var nextTicket: UInt64 = 1
    /// Tickets up to this one are wanted now (a flush is waiting): no batching delay.
    private var urgentUpTo: UInt64 = 0
    public private(set) var queuedEntries = 0
    /// Queued records per run handle (runs with none left out).
    public var queuedByRun: [String: Int] { queues.compactMapValues { $0.entries.isEmpty ? nil : $0.entries.count } }
    public private(set) var inFlight = 0

    public init(limits: BatchLimits, flushIntervalNs: UInt64, artifactLanes: Int = 1, backoffBaseNs: UInt64 = 500_000_000, backoffCapNs: UInt64 = 60_000_000_000) {
        self.limits = limits
        self.artifactLanes = max(1, artifactLanes)
        self.flushIntervalNs = flushIntervalNs
        self.backoffBaseNs = backoffBaseNs
        self.backoffCapNs = backoffCapNs
    }

    /// The last ticket handed out.
    public var lastTicket: UInt64 { nextTicket - 1 }

    /// Every ticket up to this one is settled.
    public var settledUpTo: UInt64 {
        unsettled.min.map { $0 - 1 } ?? lastTicket
    }

    public mutating func bind(_ handle: String, _ binding: Binding) {
        bindings[handle] = binding
    }

    /// Queues a record for a run; oversized logs are split. Returns the last ticket used.
    @discardableResult
    public mutating func enqueue(_ handle: String, _ record: SinkRecord, now: UInt64, mayExist: Bool = false) -> UInt64 {
        let records: [SinkRecord]
        if case .log(let batch) = record { records = limits.split(batch).map { .log($0) } } else { records = [record] }
        if queues[handle] == nil { queues[handle] = RunQueue() }
        if case .createRun(let c) = record { queues[handle]!.parent = c.parentHandle }
        if mayExist { queues[handle]!.mayExist = true }
        var ticket: UInt64 = 0
        for r in records {
            ticket = nextTicket
            nextTicket += 1
            queues[handle]!.entries.append(Entry(ticket: ticket, record: r, enqueuedAt: now))
            unsettled.insert(ticket)
            queuedEntries += 1
        }
        list(handle)
        return ticket
    }

    /// Asks for everything up to `ticket` to be sent without waiting for fuller batches.
    public mutating func hurry(upTo ticket: UInt64) {
        urgentUpTo = max(urgentUpTo, ticket)
    }

    /// Puts a run with records to send in line, unless it is there or busy already.
    private mutating func list(_ handle: String) {
        guard let queue = queues[handle], !queue.listed, !queue.busy, !queue.entries.isEmpty else { return }
        queues[handle]!.listed = true
        order.append(handle)
    }

    /// The next batch to send, if any run is ready; `draining` sends partial batches at once.
    public mutating func next(now: UInt64, draining: Bool = false) -> Batch? {
        for _ in 0..<order.count {
            let handle = order.removeFirst()
            // Taken out of the dictionary while changed, so that its deque is not copied.
            guard var queue = queues.removeValue(forKey: handle) else { continue }
            queue.listed = false
            guard !queue.entries.isEmpty else {
                queues[handle] = queue
                continue
            }
            if let batch = cut(handle: handle, queue: &queue, now: now, draining: draining) {
                if case .artifact = batch.operation {
                    // Out of the queue while in flight: the next artifact may go beside it.
                    let entry = queue.entries.removeFirst()
                    queue.artifactsInFlight[entry.ticket] = entry
                } else {
                    queue.busy = true
                }
                queues[handle] = queue
                inFlight += 1
                list(handle)  // not while busy: finish() puts it back
                return batch
            }
            queues[handle] = queue
            list(handle)
        }
        return nil
    }

    /// When the next run becomes ready by time alone (backoff over, batching delay over).
    public func nextWake(now: UInt64) -> UInt64? {
        var earliest: UInt64?
        for handle in order {
            guard let q = queues[handle], let head = q.entries.first, !q.busy, q.artifactsInFlight.isEmpty else { continue }
            var at = q.notBefore
            if case .log = head.record, flushIntervalNs > 0, head.ticket > urgentUpTo {
                at = max(at, head.enqueuedAt + flushIntervalNs)
            }
            if at > now { earliest = min(earliest ?? .max, at) }
        }
        return earliest
    }

    private func cut(handle: String, queue: inout RunQueue, now: UInt64, draining: Bool) -> Batch? {
        guard !queue.busy, queue.notBefore <= now, let head = queue.entries.first else { return nil }
        if !queue.artifactsInFlight.isEmpty {
            // Beside artifacts in flight only another artifact goes, of another path; the rest
            // waits for them, in order.
            guard case .artifact(let path, _) = head.record, queue.artifactsInFlight.count < artifactLanes,
                !queue.artifactsInFlight.values.contains(where: { if case .artifact(path, _) = $0.record { true } else { false } })
            else { return nil }
        }
        if case .createRun(let creation) = head.record {
            var parentRunID: String?
            if let parent = creation.parentHandle {
                guard let bound = bindings[parent] else { return nil }  // the parent first
                parentRunID = bound.runID
            }
            return Batch(handle: handle, entries: [head], operation: .createRun(creation, parentRunID: parentRunID, attempt: max(queue.attempt, queue.mayExist ? 1 : 0)))
        }
        guard let runID = bindings[handle]?.runID else { return nil }
        if let split = queue.split, let piece = split.pieces.first {
            return Batch(handle: handle, entries: split.entries, operation: .log(runID: runID, piece))
        }
        switch head.record {
        case .createRun: return nil
        case .updateRun(let status, let endTime):
            return Batch(handle: handle, entries: [head], operation: .updateRun(runID: runID, status: status, endTime: endTime))
        case .artifact(let path, let spoolPath):
            return Batch(handle: handle, entries: [head], operation: .artifact(runID: runID, path: path, spoolPath: spoolPath))
        case .deleteTag(let key):
            return Batch(handle: handle, entries: [head], operation: .deleteTag(runID: runID, key: key))
        case .log(let first):
            var merged = first
            var entries = [head]
            var metrics = first.metrics.count
            var params = first.params.count
            var tags = first.tags.count
            var bytes = BatchLimits.estimate(first)
            var full = false
            if !full {
                for entry in queue.entries.dropFirst() {
                    guard case .log(let next) = entry.record,
                        !next.params.keys.contains(where: { merged.params[$0] != nil })
                    else {
                        full = true
                        break
                    }
                    let (m, p, t) = (metrics + next.metrics.count, params + next.params.count, tags + next.tags.count)
                    let b = bytes + BatchLimits.estimate(next)
                    guard m <= limits.metrics, p <= limits.params, t <= limits.tags, m + p + t <= limits.entities, b <= limits.bytes else {
                        full = true
                        break
                    }
                    merged.metrics.append(contentsOf: next.metrics)
                    for (k, v) in next.params { merged.params[k] = v }
                    for (k, v) in next.tags { merged.tags[k] = v }
                    (metrics, params, tags, bytes) = (m, p, t, b)
                    entries.append(entry)
                }
            }
            let waited = now >= head.enqueuedAt + flushIntervalNs
            guard full || waited || draining || head.ticket <= urgentUpTo || flushIntervalNs == 0 else { return nil }
            return Batch(handle: handle, entries: entries, operation: .log(runID: runID, merged))
        }
    }

    /// Settles a batch with the sink's outcome.
    public mutating func finish(_ batch: Batch, _ outcome: SinkOutcome, now: UInt64, jitter: Double = 1) -> Settled {
        inFlight -= 1
        var settled = Settled()
        guard var queue = queues.removeValue(forKey: batch.handle) else { return settled }
        if case .artifact = batch.operation, let entry = queue.artifactsInFlight.removeValue(forKey: batch.entries[0].ticket) {
            queue.entries.prepend(entry)  // it is settled below as the head, or waits there for its retry
        } else {
            queue.busy = false
        }
        switch outcome {
        case .applied, .created:
            if case .created(let runID, let experimentID) = outcome {
                let binding = Binding(runID: runID, experimentID: experimentID)
                bindings[batch.handle] = binding
                settled.created = binding
            }
            queue.attempt = 0
            if var split = queue.split {
                let piece = split.pieces.removeFirst()
                settled.metrics += piece.metrics.count
                settled.systemMetrics += SinkRecord.log(piece).systemMetricCount
                queue.split = split
                settleSplitIfDone(&queue, &settled)
            } else {
                for entry in batch.entries {
                    _ = queue.entries.popFirst()
                    settled.tickets.append(entry.ticket)
                    settled.metrics += entry.record.metricCount
                    settled.systemMetrics += entry.record.systemMetricCount
                }
            }
        case .retry(let after, _):
            backOff(&queue, after: after, now: now, jitter: jitter)
        case .needsCredentials:
            backOff(&queue, after: nil, now: now, jitter: jitter)
        case .rejected(let refusal):
            queue.attempt = 0
            if case .log(_, let sent) = batch.operation {
                refuse(sent, of: batch, refusal, &queue, &settled)
            } else {
                let entry = batch.entries[0]
                _ = queue.entries.popFirst()
                settled.failures.append((entry.ticket, refusal.error))
                settled.deadLetters.append(deadLetter(batch.handle, entry.record, refusal))
                if case .createRun = entry.record {
                    // A run that cannot be created takes its records with it.
                    while let entry = queue.entries.popFirst() {
                        settled.failures.append((entry.ticket, refusal.error))
                        settled.deadLetters.append(deadLetter(batch.handle, entry.record, refusal))
                    }
                    queue.failed = refusal.error
                }
            }
        }
        for ticket in settled.tickets { settle(ticket) }
        for (ticket, _) in settled.failures { settle(ticket) }
        if !queue.entries.isEmpty || !queue.artifactsInFlight.isEmpty {
            queues[batch.handle] = queue
            list(batch.handle)
        } else if queue.failed != nil {
            queues[batch.handle] = queue
        }  // else idle: the run keeps only its binding
        return settled
    }

    private func backOff(_ queue: inout RunQueue, after: Double?, now: UInt64, jitter: Double) {
        queue.attempt += 1
        let exponential = min(backoffCapNs, backoffBaseNs << UInt64(min(queue.attempt - 1, 30)))
        var delay = UInt64(Double(exponential) * (0.5 + 0.5 * max(0, min(1, jitter))))
        if let after { delay = UInt64(min(max(after, 0), 600) * 1e9) }
        queue.notBefore = now + delay
    }

    /// Ends every run's backoff (new credentials arrived: what waited for them goes now).
    public mutating func retryNow() {
        for handle in queues.keys {
            queues[handle]!.notBefore = 0
            queues[handle]!.attempt = 0
        }
    }

    /// A log batch was refused: what the refusal names becomes a dead letter and the rest is sent
    /// again in pieces (halves when it names nothing), so that every valid entity still lands.
    private func refuse(_ sent: LogBatch, of batch: Batch, _ refusal: SinkRefusal, _ queue: inout RunQueue, _ settled: inout Settled) {
        var split = queue.split ?? Split(entries: batch.entries, pieces: [sent])
        split.pieces.removeFirst()
        let (refused, rest) = refusal.refusesRun ? (sent, []) : Self.divide(sent, by: refusal.error.message)
        if let refused {
            split.refused = split.refused ?? refusal.error
            settled.deadLetters.append(deadLetter(batch.handle, .log(refused), refusal))
        }
        for piece in rest.reversed() { split.pieces.prepend(piece) }
        if refusal.refusesRun {
            // The run itself is refused: the pieces left would be refused as well.
            for piece in split.pieces { settled.deadLetters.append(deadLetter(batch.handle, .log(piece), refusal)) }
            split.pieces.removeAll()
        }
        queue.split = split
        settleSplitIfDone(&queue, &settled)
    }

    /// Once every piece of a split batch has landed or been refused, its entries are settled:
    /// as failures when a piece was refused (their owners are told), else as applied.
    private func settleSplitIfDone(_ queue: inout RunQueue, _ settled: inout Settled) {
        guard let split = queue.split, split.pieces.isEmpty else { return }
        for entry in split.entries {
            _ = queue.entries.popFirst()
            if let error = split.refused { settled.failures.append((entry.ticket, error)) } else { settled.tickets.append(entry.ticket) }
        }
        queue.split = nil
    }

    private func deadLetter(_ handle: String, _ record: SinkRecord, _ refusal: SinkRefusal) -> DeadLetter {
        var parentRunID: String?
        if case .createRun(let c) = record, let parent = c.parentHandle { parentRunID = bindings[parent]?.runID }
        return DeadLetter(handle: handle, record: record, refusal: refusal, runID: bindings[handle]?.runID, parentRunID: parentRunID)
    }

    /// Splits a refused batch into what the server's message names (an entity by its index,
    /// `metrics[3]`, or entities by their quoted key) and the rest; with nothing named, into
    /// halves. A single entity is what was refused.
    static func divide(_ b: LogBatch, by message: String) -> (refused: LogBatch?, rest: [LogBatch]) {
        let count = b.metrics.count + b.params.count + b.tags.count
        if count <= 1 { return (b, []) }
        if let (kind, index) = namedIndex(in: message) {
            var refused = LogBatch()
            var rest = b
            switch kind {
            case "metrics" where index < b.metrics.count: refused.metrics = [rest.metrics.remove(at: index)]
            case "params" where index < b.params.count:
                let e = rest.params.remove(at: index)
                refused.params[e.key] = e.value
            case "tags" where index < b.tags.count:
                let e = rest.tags.remove(at: index)
                refused.tags[e.key] = e.value
            default: break
            }
            if !refused.isEmpty { return (refused, rest.isEmpty ? [] : [rest]) }
        }
        let keys = Set(b.metrics.map(\.key) + b.params.keys + b.tags.keys).filter { message.contains("'\($0)'") || message.contains("\"\($0)\"") }
        if !keys.isEmpty {
            var refused = LogBatch()
            var rest = LogBatch()
            for m in b.metrics { if keys.contains(m.key) { refused.metrics.append(m) } else { rest.metrics.append(m) } }
            for (k, v) in b.params { if keys.contains(k) { refused.params[k] = v } else { rest.params[k] = v } }
            for (k, v) in b.tags { if keys.contains(k) { refused.tags[k] = v } else { rest.tags[k] = v } }
            return (refused, rest.isEmpty ? [] : [rest])
        }
        var first = LogBatch()
        var second = LogBatch()
        var i = 0
        func side(_ body: (inout LogBatch) -> Void) {
            if i < count / 2 { body(&first) } else { body(&second) }
            i += 1
        }
        for (k, v) in b.params { side { $0.params[k] = v } }
        for (k, v) in b.tags { side { $0.tags[k] = v } }
        for m in b.metrics { side { $0.metrics.append(m) } }
        return (nil, [first, second])
    }

    /// `metrics[3]`, `params[0]` or `tags[1]` in a message (how MLflow names a refused entity).
    private static func namedIndex(in message: String) -> (String, Int)? {
        for kind in ["metrics", "params", "tags"] {
            guard let range = message.range(of: kind + "[") else { continue }
            let digits = message[range.upperBound...].prefix { $0.isNumber }
            if let index = Int(digits), message[range.upperBound...].dropFirst(digits.count).first == "]" { return (kind, index) }
        }
        return nil
    }

    private mutating func settle(_ ticket: UInt64) {
        queuedEntries -= 1
        settledOutOfOrder.insert(ticket)
        while let min = unsettled.min, settledOutOfOrder.remove(min) != nil { _ = unsettled.removeMin() }
    }

    /// The oldest unsettled ticket of a run (queued or in flight), nil when it has none. Only
    /// artifacts settle out of order, and a retried one goes back to the front, so the oldest is
    /// among those in flight or at the front.
    public func oldestTicket(of handle: String) -> UInt64? {
        guard let queue = queues[handle] else { return nil }
        let queued = queue.entries.prefix(artifactLanes + 1).lazy.map(\.ticket).min()
        let inFlight = queue.artifactsInFlight.keys.min()
        switch (queued, inFlight) {
        case (let a?, let b?): return min(a, b)
        case (let a, let b): return a ?? b
        }
    }

    /// Entries still queued for one run.
    public func pending(_ handle: String) -> Int { queues[handle]?.entries.count ?? 0 }

    /// The error that made a run impossible to create, if any.
    public func failure(of handle: String) -> ProtocolError? { queues[handle]?.failed }
}
