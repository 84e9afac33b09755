import ArmoryProtocol

/// A record the journal writer hands the sender: its run, its journal sequence number and the user
/// it came from.
struct JournaledRecord: Sendable {
    var handle: String
    var record: SinkRecord
    var sequence: UInt64
    var uid: UInt32?
}

/// Counters of one destination's uploads, reported by `armoryctl status`.
public struct UploadCounters: Sendable, Equatable {
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

/// What a destination's sender decides, without I/O (docs/architecture.md, "The pipeline"):
/// which of the records the journal writer hands over wait in memory and which in the journal
/// only (the spill), what to read back and when, what to send next, what a sink call's outcome
/// settles, and how far the journal is settled. `Sender` carries its decisions out.
struct SenderStateMachine: Sendable {

    /// What to read back from the journal: records after `first - 1` through `last`.
    struct ReadBack: Sendable, Equatable {
        var position: Journal.Position?
        var first: UInt64
        var last: UInt64
    }

    /// What the sender does after a sink call or a read-back.
    struct Settlement: Sendable {
        /// Records whose outcome is known, by sequence number (a record split into pieces: once
        /// its last piece settled).
        var outcomes: [(sequence: UInt64, result: Result<UploadScheduler.Binding?, ProtocolError>)] = []
        /// The run the call created: the journal records its binding before the watermark below.
        var created: (handle: String, binding: UploadScheduler.Binding)?
        /// How far the journal is settled now.
        var journalSettled: UInt64?
        var deadLetters: [DeadLetter] = []
        /// Whether the server started or stopped refusing the credentials, and why.
        var credentialsChanged: (refused: String?, changed: Bool) = (nil, false)
        /// Spool files of records that need no sending (a sync's, replayed after a restart).
        var unlink: [String] = []
    }

    private(set) var scheduler: UploadScheduler
    /// The records in memory, by ticket and sequence number.
    private(set) var queued = QueuedRecords()
    private(set) var spill: Spill?
    /// The memory the queued records hold.
    var memoryBytes: Int { queued.bytes }
    /// The last record received.
    private(set) var lastSequence: UInt64 = 0
    /// The last journal entry the writer had appended with the records received: every record
    /// up to it is here.
    private var appendedThrough: UInt64 = 0
    /// Every record up to this one is settled (applied or refused).
    private(set) var settledSequence: UInt64 = 0
    /// The last record a restart found in the journal.
    private var replayedThrough: UInt64 = 0
    /// The watermark last recorded in the journal, and when (monotonic nanoseconds).
    private var recorded: UInt64 = 0
    private var recordedAt: UInt64 = 0
    /// How often the watermark is recorded while it moves (each time after the sink made what
    /// it wrote durable).
    let recordIntervalNs: UInt64
    private(set) var counters = UploadCounters()
    private(set) var stopping = false
    private(set) var stopped = false
    /// Bytes of queued records kept in memory; the rest waits on disk.
    let memoryBound: Int
    /// Whether the sink takes run ids assigned by the daemon (a replayed creation is sent again).
    let assignsRunIDs: Bool

    init(limits: BatchLimits, flushIntervalNs: UInt64, memoryBound: Int, assignsRunIDs: Bool, artifactLanes: Int = 1, recordIntervalNs: UInt64 = 1_000_000_000) {
        scheduler = UploadScheduler(limits: limits, flushIntervalNs: flushIntervalNs, artifactLanes: artifactLanes)
        self.recordIntervalNs = recordIntervalNs
        self.memoryBound = memoryBound
        self.assignsRunIDs = assignsRunIDs
    }

    // MARK: Records in

    /// Takes records the writer journaled, in journal order: into memory while it has room, else
    /// into the spill. A light user's record (within an even share of memory, nothing of its run
    /// or user in the spill) takes the quarter kept past the bound instead, going around the
    /// spill: one user's backlog holds no other user back, even when that user's record is the
    /// one that first finds memory full (docs/architecture.md, "Backpressure and fair shares").
    mutating func receive(_ records: some Sequence<JournaledRecord>, appendedThrough: UInt64, now: UInt64) {
        for r in records {
            lastSequence = r.sequence
            let footprint = BatchLimits.memoryFootprint(r.record)
            if spill == nil && memoryBytes + footprint <= memoryBound {
                queue(r.handle, r.record, uid: r.uid, sequence: r.sequence, bytes: footprint, now: now)
            } else if spill?.letsThrough(r.handle, uid: r.uid) ?? true, queued.fitsInAShare(r.uid, adding: footprint, of: memoryBound),
                memoryBytes + footprint <= memoryBound + memoryBound / 4
            {
                spill?.wentAround(r.sequence)
                queue(r.handle, r.record, uid: r.uid, sequence: r.sequence, bytes: footprint, now: now, aroundSpill: spill != nil)
            } else {
                if spill == nil { spill = Spill(firstUnloaded: r.sequence, lastSpilled: r.sequence) }
                spill!.add(r.sequence, handle: r.handle, uid: r.uid)
            }
        }
        self.appendedThrough = max(self.appendedThrough, appendedThrough)
    }

    /// A run that already exists at the destination: its records need no creation.
    mutating func bind(_ handle: String, _ binding: UploadScheduler.Binding) {
        scheduler.bind(handle, binding)
    }

    /// Takes what a restart found unsettled in the journal: runs keep their ids, a creation that
    /// may have reached the server looks for its run first. `missingSpools`: artifact records
    /// whose spool file is gone (already stored). Past the memory bound the rest is read later.
    mutating func replay(_ recovered: JournalState, missingSpools: Set<UInt64>, now: UInt64) -> Settlement {
        for entry in recovered.runs.values {
            if let runID = entry.runID { scheduler.bind(entry.handle, .init(runID: runID, experimentID: entry.experimentID)) }
        }
        replayedThrough = recovered.lastRecordLSN
        var settlement = Settlement()
        for p in recovered.unsettled { requeue(p, missingSpools: missingSpools, now: now, into: &settlement) }
        if let disk = recovered.leftOnDisk {
            spill = Spill(firstUnloaded: disk.from, lastSpilled: recovered.lastRecordLSN, count: disk.count, handlesKnown: false)
        }
        lastSequence = max(lastSequence, recovered.lastRecordLSN)
        appendedThrough = max(appendedThrough, recovered.highestLSN)
        settledSequence = recovered.settled
        recorded = recovered.settled
        settleIfIdle(&settlement)
        return settlement
    }

    /// Queues a record read back from the journal, unless it needs no sending.
    private mutating func requeue(
        _ p: JournalState.Pending, uid: UInt32? = nil, missingSpools: Set<UInt64>, now: UInt64, into settlement: inout Settlement
    ) {
        if missingSpools.contains(p.lsn) { return settlement.outcomes.append((p.lsn, .success(nil))) }  // already stored
        // A sync's records from before a restart are not sent again: the next sync asks the
        // destination what it holds and sends the rest, so nothing lands twice.
        if p.lsn <= replayedThrough, RecordOrigin(handle: p.handle) == .sync {
            if case .artifact(_, let spool) = p.record { settlement.unlink.append(spool) }
            return
        }
        if case .createRun = p.record, scheduler.bindings[p.handle] != nil, !assignsRunIDs {
            return settlement.outcomes.append((p.lsn, .success(scheduler.bindings[p.handle])))
        }
        queue(p.handle, p.record, uid: uid, sequence: p.lsn, bytes: BatchLimits.memoryFootprint(p.record), now: now, mayExist: true)
    }

    private mutating func queue(
        _ handle: String, _ record: SinkRecord, uid: UInt32?, sequence: UInt64, bytes: Int, now: UInt64, mayExist: Bool = false,
        aroundSpill: Bool = false
    ) {
        let ticket = scheduler.enqueue(handle, record, now: now, mayExist: mayExist)
        queued.append(.init(ticket: ticket, sequence: sequence, bytes: bytes, uid: uid), aroundSpill: aroundSpill)
    }

    // MARK: Reading back

    /// What to read back from the journal once memory has room, if anything (and not already
    /// being read).
    mutating func readBack() -> ReadBack? {
        guard var spill, !spill.loading, memoryBytes < memoryBound / 2 else { return nil }
        spill.loading = true
        self.spill = spill
        return ReadBack(position: spill.position, first: spill.firstUnloaded, last: spill.lastSpilled)
    }

    /// Journal bytes to read back at a time. A record holds ~3.5× its journal size once queued
    /// (measured: ~285 bytes for a single metric whose record is ~80), so this is about a
    /// quarter of the memory bound.
    var readBackBytes: Int { memoryBound / 16 }

    /// Takes what was read back: the spilled records among them (not those that went around).
    mutating func readBack(_ read: [JournalState.Pending], next: Journal.Position?, missingSpools: Set<UInt64>, now: UInt64) -> Settlement {
        var settlement = Settlement()
        for p in read {
            let uid = spill!.handles[p.handle]?.uid
            if spill!.takeBack(p.lsn, handle: p.handle) { requeue(p, uid: uid, missingSpools: missingSpools, now: now, into: &settlement) }
        }
        spill!.loading = false
        spill!.position = next
        if let lastRead = read.last?.lsn { spill!.firstUnloaded = lastRead + 1 }
        if spill!.firstUnloaded > spill!.lastSpilled {
            spill = nil  // caught up: new records go to memory again
        }
        settleIfIdle(&settlement)
        return settlement
    }

    // MARK: Sending

    /// The batches to send now, up to `concurrency` calls in flight; when to look again; and
    /// whether the sender is done (stopping with nothing left).
    mutating func nextBatches(now: UInt64, concurrency: Int) -> (batches: [UploadScheduler.Batch], wakeAt: UInt64?, done: Bool) {
        if stopped { return ([], nil, true) }
        var out: [UploadScheduler.Batch] = []
        while scheduler.inFlight < concurrency, let batch = scheduler.next(now: now, draining: stopping) {
            out.append(batch)
        }
        if stopping && scheduler.queuedEntries == 0 && scheduler.inFlight == 0 && spill == nil {
            stopped = true
            return (out, nil, true)
        }
        var wakeAt = scheduler.nextWake(now: now)
        if settledSequence > recorded { wakeAt = min(wakeAt ?? .max, recordedAt + recordIntervalNs) }
        return (out, wakeAt, false)
    }

    /// The watermark to record in the journal now, once the sink made what it wrote durable:
    /// when it moved and the interval since the last record is over (or `now` at the end).
    mutating func recordDue(now: UInt64, atOnce: Bool = false) -> UInt64? {
        guard settledSequence > recorded, atOnce || now >= recordedAt + recordIntervalNs else { return nil }
        recorded = settledSequence
        recordedAt = now
        return recorded
    }

    /// A sink call's outcome: what it settled, the counters, the credentials' state.
    mutating func finish(_ batch: UploadScheduler.Batch, _ outcome: SinkOutcome, now: UInt64, wallMs: Int64, jitter: Double) -> Settlement {
        let settled = scheduler.finish(batch, outcome, now: now, jitter: jitter)
        var settlement = Settlement(deadLetters: settled.deadLetters)
        if let created = settled.created { settlement.created = (batch.handle, created) }
        // Memory is given back as each record settles, in any order: runs settle at their own
        // pace, and the journal's watermark (below) waits for the oldest.
        for ticket in settled.tickets {
            if let sequence = queued.release(ticket) { settlement.outcomes.append((sequence, .success(settled.created))) }
        }
        for (ticket, error) in settled.failures {
            if let sequence = queued.release(ticket) { settlement.outcomes.append((sequence, .failure(error))) }
        }
        queued.dropSettled(upTo: scheduler.settledUpTo)
        // Settled is everything below the oldest record still waiting, in memory or on disk.
        var settledThrough = lastSequence
        if let oldest = queued.oldestSequence { settledThrough = min(settledThrough, oldest - 1) }
        if let spill { settledThrough = min(settledThrough, spill.firstUnloaded - 1) }
        settledSequence = max(settledSequence, settledThrough)
        settleIfIdle(&settlement)
        settlement.journalSettled = settledSequence
        count(settled, outcome, wallMs: wallMs, into: &settlement)
        return settlement
    }

    private mutating func count(_ settled: UploadScheduler.Settled, _ outcome: SinkOutcome, wallMs: Int64, into settlement: inout Settlement) {
        counters.appliedRecords += UInt64(settled.tickets.count)
        counters.rejectedRecords += UInt64(settled.failures.count)
        counters.deadLetters += UInt64(settled.deadLetters.count)
        counters.metricsWritten += UInt64(settled.metrics)
        counters.systemMetricsWritten += UInt64(settled.systemMetrics)
        counters.writeRate.add(UInt64(settled.metrics), atMs: wallMs)
        let wasRefusingCredentials = counters.needsCredentials != nil
        switch outcome {
        case .applied, .created:
            counters.lastSuccessMs = wallMs
            counters.needsCredentials = nil
        case .needsCredentials(let reason):
            counters.needsCredentials = reason
            counters.lastError = reason + ": records wait in the journal for working credentials"
            counters.lastErrorMs = wallMs
        case .retry(_, let reason):
            counters.retries += 1
            counters.lastError = reason
            counters.lastErrorMs = wallMs
        case .rejected(let refusal):
            counters.lastError = refusal.error.message
            counters.lastErrorMs = wallMs
        }
        settlement.credentialsChanged = (counters.needsCredentials, wasRefusingCredentials != (counters.needsCredentials != nil))
    }

    /// With nothing queued and nothing left on disk, everything the writer had journaled is
    /// settled (records a restart dropped, say, and the journal-only entries after the last
    /// record).
    private mutating func settleIfIdle(_ settlement: inout Settlement) {
        guard queued.isEmpty, spill == nil else { return }
        settledSequence = max(settledSequence, lastSequence, appendedThrough)
        settlement.journalSettled = settledSequence
    }

    // MARK: Flushes, credentials, stopping

    /// Asks for everything up to sequence number `sequence` to be sent without waiting for
    /// fuller batches; whether it is settled already.
    mutating func hurry(upTo sequence: UInt64) -> Bool {
        if settledSequence >= sequence { return true }
        let last = queued.lastTicket(upTo: sequence) ?? scheduler.lastTicket
        scheduler.hurry(upTo: spill == nil ? last : scheduler.lastTicket)
        return false
    }

    /// Whether every record of `runs` up to sequence number `sequence` is settled: what a
    /// session's `flush wait=uploaded` waits for, so not for other runs' backlog. A run with
    /// records in the spill is not (nor any run, for what a restart left on disk unread).
    func isSettled(upTo sequence: UInt64, runs: Set<String>) -> Bool {
        if settledSequence >= sequence { return true }
        if let spill, !spill.handlesKnown || runs.contains(where: { spill.handles[$0] != nil }) { return false }
        for run in runs {
            if let oldest = scheduler.oldestTicket(of: run), queued.sequence(holding: oldest).map({ $0 <= sequence }) ?? true { return false }
        }
        return true
    }

    /// How many of the records up to sequence number `sequence` are not settled yet.
    func pending(upTo sequence: UInt64) -> Int {
        guard sequence > settledSequence else { return 0 }
        return queued.count(upTo: sequence) + (spill.map { sequence >= $0.firstUnloaded ? $0.count : 0 } ?? 0)
    }

    /// New credentials: what waited for them is sent at once (until the server refuses these too).
    mutating func credentialsReplaced() {
        scheduler.retryNow()
        counters.needsCredentials = nil
    }

    /// The counters, with the queue figures derived from the state.
    var counterSnapshot: UploadCounters {
        var snapshot = counters
        snapshot.spilledRecords = spill?.count ?? 0
        snapshot.pendingRecords = scheduler.queuedEntries + snapshot.spilledRecords
        return snapshot
    }

    /// Records not sent: queued in memory and left in the journal.
    var unsent: Int { scheduler.queuedEntries + (spill?.count ?? 0) }

    /// Sends what is queued without batching delays, then stops.
    mutating func stop() { stopping = true }

    /// Stops at once (the shutdown's time is up).
    mutating func halt() { stopped = true }
}
