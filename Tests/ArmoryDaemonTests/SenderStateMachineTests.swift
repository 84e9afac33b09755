import ArmoryProtocol
import Testing

@testable import ArmoryDaemon

/// A destination's sender decided without I/O: memory or spill, what goes around, what a sink
/// call settles, and how far the journal is settled.
@Suite struct SenderStateMachineTests {
    func metric(_ value: Double) -> SinkRecord {
        .log(LogBatch(metrics: [MetricPoint(key: "m", value: value, step: 0, timestamp: 1)]))
    }

    /// A machine whose memory holds `fit` single-metric records.
    func machine(fit: Int) -> SenderStateMachine {
        SenderStateMachine(
            limits: .mlflow, flushIntervalNs: 0, memoryBound: fit * BatchLimits.memoryFootprint(metric(0)), assignsRunIDs: false)
    }

    func incoming(_ handle: String, _ sequence: UInt64, uid: UInt32) -> JournaledRecord {
        .init(handle: handle, record: metric(Double(sequence)), sequence: sequence, uid: uid)
    }

    /// Every batch ready now, each finished as applied; the settlements in order.
    func sendAll(_ m: inout SenderStateMachine) -> [SenderStateMachine.Settlement] {
        var settlements: [SenderStateMachine.Settlement] = []
        while true {
            let (batches, _, _) = m.nextBatches(now: 0, concurrency: 100)
            if batches.isEmpty { return settlements }
            for batch in batches { settlements.append(m.finish(batch, .applied, now: 0, wallMs: 1, jitter: 0)) }
        }
    }

    @Test func pastTheMemoryBoundRecordsSpillAndAnotherUsersRunGoesAround() {
        var m = machine(fit: 4)
        m.bind("a", .init(runID: "ra", experimentID: "1"))
        m.bind("b", .init(runID: "rb", experimentID: "1"))
        m.receive((1...5).map { incoming("a", $0, uid: 1) }, appendedThrough: 5, now: 0)
        #expect(m.spill?.count == 1 && m.spill?.firstUnloaded == 5)
        // B's user has nothing on disk: its record stays in memory, in the quarter kept for that.
        m.receive([incoming("b", 6, uid: 2)], appendedThrough: 7, now: 0)
        #expect(m.spill?.count == 1 && m.spill?.around.first == 6...6)
        // A's next record goes behind A's spilled one.
        m.receive([incoming("a", 8, uid: 1)], appendedThrough: 8, now: 0)
        #expect(m.spill?.count == 2)

        let settlements = sendAll(&m)
        #expect(settlements.flatMap { $0.outcomes.map(\.sequence) }.sorted() == [1, 2, 3, 4, 6])
        // Settled stops below the oldest record still on disk, though B's later one landed.
        #expect(m.settledSequence == 4 && settlements.last?.journalSettled == 4)
        #expect(m.pending(upTo: 8) == 2)
    }

    @Test func aLightUsersRecordThatFindsMemoryFullDoesNotStartTheSpill() {
        var m = machine(fit: 8)
        m.bind("a", .init(runID: "ra", experimentID: "1"))
        m.bind("b", .init(runID: "rb", experimentID: "1"))
        m.receive((1...8).map { incoming("a", $0, uid: 1) }, appendedThrough: 8, now: 0)
        // Memory is full of A's records when B's first one comes: it takes the room past the
        // bound. A holds more than an even share, so the spill starts with A's next record, and
        // B's later ones are not behind it.
        m.receive([incoming("b", 9, uid: 2), incoming("a", 10, uid: 1), incoming("b", 11, uid: 2)], appendedThrough: 11, now: 0)
        #expect(m.spill?.firstUnloaded == 10 && m.spill?.count == 1)
        #expect(m.isSettled(upTo: 11, runs: ["b"]) == false)
        _ = sendAll(&m)
        #expect(m.isSettled(upTo: 11, runs: ["b"]) && !m.isSettled(upTo: 11, runs: ["a"]))
    }

    @Test func theReadBackWaitsForRoomAndSkipsWhatWentAround() throws {
        var m = machine(fit: 4)
        m.bind("a", .init(runID: "ra", experimentID: "1"))
        m.bind("b", .init(runID: "rb", experimentID: "1"))
        m.receive((1...5).map { incoming("a", $0, uid: 1) } + [incoming("b", 6, uid: 2)], appendedThrough: 6, now: 0)
        let whileFull = m.readBack()
        #expect(whileFull == nil)  // memory is full
        _ = sendAll(&m)
        let first = m.readBack()
        let request = try #require(first)
        #expect(request.first == 5 && request.last == 5)
        let second = m.readBack()
        #expect(second == nil)  // one read at a time
        // The journal gives back everything in the range it read, including what went around.
        let read = [5, 6].map { JournalState.Pending(lsn: $0, handle: $0 == 5 ? "a" : "b", record: metric(Double($0))) }
        _ = m.readBack(read, next: nil, missingSpools: [], now: 0)
        #expect(m.spill == nil && m.scheduler.queuedEntries == 1)  // 6 was not queued twice
        let settled = sendAll(&m)
        #expect(settled.flatMap { $0.outcomes.map(\.sequence) } == [5])
        // Nothing left: everything the writer appended is settled.
        #expect(m.settledSequence == 6 && settled.last?.journalSettled == 6)
    }

    @Test func anIdleSenderSettlesTheJournalOnlyEntriesAfterItsLastRecord() {
        var m = machine(fit: 10)
        m.bind("a", .init(runID: "ra", experimentID: "1"))
        m.receive([incoming("a", 1, uid: 1)], appendedThrough: 3, now: 0)  // 2, 3: a session's record and mark
        let before = m.hurry(upTo: 1)
        let settled = sendAll(&m)
        let after = m.hurry(upTo: 3)
        #expect(!before && settled.last?.journalSettled == 3 && after)
    }

    @Test func aCreationSettlesWithItsBindingAndARefusalWithItsError() throws {
        var m = machine(fit: 10)
        let creation = RunCreation(handle: "a", runID: nil, experimentName: "e", name: "a", userID: "u", startTime: 0, tags: [:], parentHandle: nil)
        m.receive([.init(handle: "a", record: .createRun(creation), sequence: 1, uid: 1), incoming("a", 2, uid: 1)], appendedThrough: 2, now: 0)
        let (create, _, _) = m.nextBatches(now: 0, concurrency: 4)
        let created = m.finish(try #require(create.first), .created(runID: "r1", experimentID: "7"), now: 0, wallMs: 1, jitter: 0)
        #expect(created.created?.handle == "a" && created.created?.binding.runID == "r1")
        let binding = try created.outcomes[0].result.get()
        #expect(created.outcomes.count == 1 && binding == .init(runID: "r1", experimentID: "7"))
        #expect(created.journalSettled == 1)

        let (log, _, _) = m.nextBatches(now: 0, concurrency: 4)
        let refusal = SinkRefusal(ProtocolError(.invalidValue, "no"), httpStatus: 400, serverCode: "INVALID_PARAMETER_VALUE")
        let refused = m.finish(try #require(log.first), .rejected(refusal), now: 0, wallMs: 2, jitter: 0)
        #expect(refused.deadLetters.count == 1 && refused.journalSettled == 2)
        guard case .failure(let error) = refused.outcomes.first?.result else {
            Issue.record("the refused record's outcome is \(String(describing: refused.outcomes.first))")
            return
        }
        #expect(error.code == .invalidValue)
        #expect(m.counterSnapshot.rejectedRecords == 1 && m.counterSnapshot.lastError == "no")
    }

    @Test func refusedCredentialsAreReportedOnceWhenTheyStartAndOnceWhenTheyEnd() throws {
        var m = machine(fit: 10)
        m.bind("a", .init(runID: "ra", experimentID: "1"))
        m.receive([incoming("a", 1, uid: 1)], appendedThrough: 1, now: 0)
        var (batches, _, _) = m.nextBatches(now: 0, concurrency: 4)
        let first = m.finish(try #require(batches.first), .needsCredentials(reason: "401"), now: 0, wallMs: 1, jitter: 0)
        #expect(first.credentialsChanged.changed && first.credentialsChanged.refused == "401")
        #expect(m.pending(upTo: 1) == 1 && first.outcomes.isEmpty)
        m.credentialsReplaced()
        (batches, _, _) = m.nextBatches(now: 0, concurrency: 4)
        let second = m.finish(try #require(batches.first), .applied, now: 0, wallMs: 2, jitter: 0)
        #expect(!second.credentialsChanged.changed && second.credentialsChanged.refused == nil)  // new credentials cleared it already
        #expect(m.pending(upTo: 1) == 0)
    }

    @Test func aReplayDropsWhatNeedsNoSending() {
        var state = JournalState(collectPending: true)
        let creation = RunCreation(handle: "a", runID: nil, experimentName: "e", name: "a", userID: "u", startTime: 0, tags: [:], parentHandle: nil)
        state.apply(.record(handle: "a", .createRun(creation)), lsn: 1)
        state.apply(.bind(handle: "a", runID: "r1", experimentID: "1"), lsn: 2)
        state.apply(.record(handle: "a", .artifact(path: "x", spoolPath: "/gone")), lsn: 3)
        state.apply(.record(handle: "sync-src", .artifact(path: "y", spoolPath: "/spool/y")), lsn: 4)
        state.apply(.record(handle: "a", metric(1)), lsn: 5)
        var m = machine(fit: 10)
        let settlement = m.replay(state, missingSpools: [3], now: 0)
        // The creation reached the server (bound), the artifact was stored, the sync's record is
        // left to the next sync: only the metric is sent again.
        #expect(settlement.outcomes.map(\.sequence) == [1, 3] && settlement.unlink == ["/spool/y"])
        #expect(m.scheduler.queuedEntries == 1 && m.scheduler.bindings["a"]?.runID == "r1")
        _ = sendAll(&m)
        #expect(m.settledSequence == 5)
    }
    @Test func theWatermarkIsRecordedOncePerIntervalWhileItMovesAndNeverWhenIdle() {
        var m = SenderStateMachine(limits: .mlflow, flushIntervalNs: 0, memoryBound: 1 << 20, assignsRunIDs: false, recordIntervalNs: 1000)
        m.bind("a", .init(runID: "ra", experimentID: "1"))
        #expect(m.recordDue(now: 5000) == nil)  // nothing settled: nothing to record, no timer
        #expect(m.nextBatches(now: 5000, concurrency: 4).wakeAt == nil)
        m.receive([incoming("a", 1, uid: 1)], appendedThrough: 1, now: 5000)
        _ = sendAll(&m)
        #expect(m.recordDue(now: 5000) == 1)
        m.receive([incoming("a", 2, uid: 1)], appendedThrough: 2, now: 5100)
        _ = sendAll(&m)
        // Moved again within the interval: recorded when it is over, which the sender wakes for.
        #expect(m.recordDue(now: 5100) == nil && m.nextBatches(now: 5100, concurrency: 4).wakeAt == 6000)
        #expect(m.recordDue(now: 6000) == 2 && m.recordDue(now: 9000) == nil)
        // At shutdown whatever moved is recorded at once.
        m.receive([incoming("a", 3, uid: 1)], appendedThrough: 3, now: 9000)
        _ = sendAll(&m)
        #expect(m.recordDue(now: 9001, atOnce: true) == 3)
    }

    @Test func aRunIsSettledWhileAnotherRunsBacklogWaits() {
        var m = machine(fit: 4)
        m.bind("a", .init(runID: "ra", experimentID: "1"))
        m.bind("b", .init(runID: "rb", experimentID: "1"))
        m.receive((1...5).map { incoming("a", $0, uid: 1) } + [incoming("b", 6, uid: 2)], appendedThrough: 6, now: 0)
        #expect(!m.isSettled(upTo: 6, runs: ["b"]))  // queued
        var (batches, _, _) = m.nextBatches(now: 0, concurrency: 4)
        let bBatch = batches.first { $0.handle == "b" }!
        _ = m.finish(bBatch, .applied, now: 0, wallMs: 1, jitter: 0)
        // B's record landed; A's are queued and on disk: B is settled, A and the whole are not.
        #expect(m.isSettled(upTo: 6, runs: ["b"]) && !m.isSettled(upTo: 6, runs: ["a", "b"]) && m.settledSequence == 0)
        for batch in batches where batch.handle == "a" { _ = m.finish(batch, .applied, now: 0, wallMs: 1, jitter: 0) }
        #expect(!m.isSettled(upTo: 5, runs: ["a"]) && m.settledSequence == 4)  // A's fifth is still on disk
        (batches, _, _) = m.nextBatches(now: 0, concurrency: 4)
        #expect(batches.isEmpty)
        // Nothing of a run queued up to the sequence asked: settled, though later ones wait.
        m.receive([incoming("b", 7, uid: 2)], appendedThrough: 7, now: 0)
        #expect(m.isSettled(upTo: 6, runs: ["b"]) && !m.isSettled(upTo: 7, runs: ["b"]))
    }
}
