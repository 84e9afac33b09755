import ArmoryProtocol
import Testing

@testable import ArmoryDaemon

/// The uploader's scheduling rules, driven without a sink.
@Suite struct UploadSchedulerTests {
    func creation(_ handle: String, parent: String? = nil) -> RunCreation {
        RunCreation(handle: handle, runID: nil, experimentName: "e", name: handle, userID: "u", startTime: 0, tags: [:], parentHandle: parent)
    }

    func metrics(_ n: Int, key: String = "m") -> LogBatch {
        LogBatch(metrics: (0..<n).map { MetricPoint(key: key, value: Double($0), step: Int64($0), timestamp: 1) })
    }

    struct NoBatch: Error {}

    /// The next batch, or a test failure when the scheduler has none ready.
    func take(_ s: inout UploadScheduler, _ now: UInt64) throws -> UploadScheduler.Batch {
        guard let batch = s.next(now: now) else { throw NoBatch() }
        return batch
    }

    func scheduler(flushNs: UInt64 = 0) -> UploadScheduler {
        UploadScheduler(limits: .mlflow, flushIntervalNs: flushNs, backoffBaseNs: 1_000, backoffCapNs: 1_000_000)
    }

    @Test func recordsWaitForTheirRunToBeCreated() throws {
        var s = scheduler()
        s.enqueue("a", .createRun(creation("a")), now: 0)
        s.enqueue("a", .log(metrics(3)), now: 0)
        let create = try take(&s, 0)
        guard case .createRun(_, nil, 0) = create.operation else {
            Issue.record("\(create.operation)")
            return
        }
        #expect(s.next(now: 0) == nil)  // one call in flight per run
        let settled = s.finish(create, .created(runID: "r1", experimentID: "1"), now: 0)
        #expect(settled.created == .init(runID: "r1", experimentID: "1"))
        let log = try take(&s, 0)
        #expect(log.operation == .log(runID: "r1", metrics(3)))
    }

    @Test func aChainIsCreatedOnlyAfterItsParentWithTheParentsID() throws {
        var s = scheduler()
        s.enqueue("parent", .createRun(creation("parent")), now: 0)
        s.enqueue("chain", .createRun(creation("chain", parent: "parent")), now: 0)
        let first = try take(&s, 0)
        #expect(first.handle == "parent")
        #expect(s.next(now: 0) == nil)  // the chain waits for its parent
        _ = s.finish(first, .created(runID: "P", experimentID: "1"), now: 0)
        let chain = try take(&s, 0)
        guard case .createRun(_, "P", _) = chain.operation else {
            Issue.record("\(chain.operation)")
            return
        }
    }

    @Test func logsAreMergedUpToMLflowsLimits() throws {
        var s = scheduler()
        s.bind("a", .init(runID: "r", experimentID: "1"))
        for _ in 0..<5 { s.enqueue("a", .log(metrics(300)), now: 0) }
        let batch = try take(&s, 0)
        #expect(batch.entries.count == 3)  // 900 metrics; a fourth would pass 1000
        guard case .log(_, let merged) = batch.operation else {
            Issue.record("not a log")
            return
        }
        #expect(merged.metrics.count == 900)
    }

    @Test func aDeletedTagIsNeverMergedPastTheTagWritesAroundIt() throws {
        var s = scheduler()
        s.bind("a", .init(runID: "r", experimentID: "1"))
        s.enqueue("a", .log(LogBatch(tags: ["t": "1"])), now: 0)
        s.enqueue("a", .deleteTag(key: "t"), now: 0)
        s.enqueue("a", .log(LogBatch(tags: ["t": "2"])), now: 0)
        var operations: [SinkOperation] = []
        while let batch = s.next(now: 0) {
            operations.append(batch.operation)
            _ = s.finish(batch, .applied, now: 0)
        }
        #expect(operations == [.log(runID: "r", LogBatch(tags: ["t": "1"])), .deleteTag(runID: "r", key: "t"), .log(runID: "r", LogBatch(tags: ["t": "2"]))])
    }

    @Test func oversizedRecordsAreSplitAtEnqueue() throws {
        var s = scheduler()
        s.bind("a", .init(runID: "r", experimentID: nil))
        var batch = metrics(2500)
        for i in 0..<250 { batch.params["p\(i)"] = "v" }
        for i in 0..<350 { batch.tags["t\(i)"] = "v" }
        s.enqueue("a", .log(batch), now: 0)
        var totals = (metrics: 0, params: 0, tags: 0)
        while let next = s.next(now: 0) {
            guard case .log(_, let b) = next.operation else { break }
            #expect(b.metrics.count <= 1000 && b.params.count <= 100 && b.tags.count <= 100)
            #expect(b.metrics.count + b.params.count + b.tags.count <= 1000)
            totals.metrics += b.metrics.count
            totals.params += b.params.count
            totals.tags += b.tags.count
            _ = s.finish(next, .applied, now: 0)
        }
        #expect(totals.metrics == 2500 && totals.params == 250 && totals.tags == 350)
        #expect(s.queuedEntries == 0)
    }

    @Test func theSameParamKeyNeverTwiceInOneBatch() throws {
        var s = scheduler()
        s.bind("a", .init(runID: "r", experimentID: nil))
        s.enqueue("a", .log(LogBatch(params: ["k": "1"])), now: 0)
        s.enqueue("a", .log(LogBatch(params: ["k": "1"])), now: 0)
        #expect(try take(&s, 0).entries.count == 1)
    }

    @Test func runsAreServedRoundRobin() throws {
        var s = scheduler()
        for h in ["a", "b", "c"] {
            s.bind(h, .init(runID: h, experimentID: nil))
            s.enqueue(h, .updateRun(status: .finished, endTime: 1), now: 0)
            s.enqueue(h, .updateRun(status: .finished, endTime: 2), now: 0)
        }
        var order: [String] = []
        while let batch = s.next(now: 0) {
            order.append(batch.handle)
            _ = s.finish(batch, .applied, now: 0)
        }
        #expect(order == ["a", "b", "c", "a", "b", "c"])
    }

    @Test func aSlowRunDoesNotStallTheOthers() throws {
        var s = scheduler()
        for h in ["slow", "fast"] {
            s.bind(h, .init(runID: h, experimentID: nil))
            s.enqueue(h, .log(metrics(1)), now: 0)
            s.enqueue(h, .updateRun(status: .finished, endTime: 1), now: 0)
        }
        let slow = try take(&s, 0)
        #expect(slow.handle == "slow")
        let fast = try take(&s, 0)
        #expect(fast.handle == "fast")
        _ = s.finish(fast, .applied, now: 0)
        #expect(s.next(now: 0)?.handle == "fast")  // while "slow" is still in flight
    }

    @Test func retriesBackOffAndHonourRetryAfter() throws {
        var s = scheduler()
        s.bind("a", .init(runID: "r", experimentID: nil))
        s.enqueue("a", .log(metrics(1)), now: 0)
        let first = try take(&s, 0)
        _ = s.finish(first, .retry(after: 2, reason: "503"), now: 100)
        #expect(s.next(now: 100 + 1_999_999_999) == nil)
        #expect(s.nextWake(now: 100) == 100 + 2_000_000_000)
        let again = try take(&s, 100 + 2_000_000_000)
        // Without Retry-After: exponential from the base, with jitter, under the cap.
        _ = s.finish(again, .retry(after: nil, reason: "reset"), now: 0)
        let wake = try! #require(s.nextWake(now: 0))
        #expect(wake >= 1_000 && wake <= 2_000)
    }

    @Test func aCreateAfterARetryLooksForTheRunFirst() throws {
        var s = scheduler()
        s.enqueue("a", .createRun(creation("a")), now: 0)
        let first = try take(&s, 0)
        _ = s.finish(first, .retry(after: 0, reason: "timeout"), now: 0)
        let second = try take(&s, 1)
        guard case .createRun(_, _, let attempt) = second.operation else {
            Issue.record("not a create")
            return
        }
        #expect(attempt == 1)
    }

    /// Sends every batch the scheduler has, refusing those `refuses` answers for; returns the
    /// settled results and the number of calls.
    func drain(_ s: inout UploadScheduler, refuses: (LogBatch) -> SinkRefusal?) -> (settled: [UploadScheduler.Settled], calls: Int) {
        var all: [UploadScheduler.Settled] = []
        var calls = 0
        while let batch = s.next(now: 0) {
            calls += 1
            guard case .log(_, let sent) = batch.operation else {
                Issue.record("not a log: \(batch.operation)")
                break
            }
            all.append(s.finish(batch, refuses(sent).map { .rejected($0) } ?? .applied, now: 0))
        }
        return (all, calls)
    }

    @Test func aRefusedBatchIsSplitDownToTheKeyTheServerNamesAndEverythingElseLands() throws {
        var s = scheduler()
        s.bind("a", .init(runID: "r", experimentID: nil))
        for step in 0..<50 {
            s.enqueue("a", .log(LogBatch(metrics: ["acc", "bad key", "loss"].map { MetricPoint(key: $0, value: 1, step: Int64(step), timestamp: 1) })), now: 0)
        }
        let refusal = SinkRefusal(ProtocolError(.sinkRejected, "Invalid metric name: 'bad key'."), httpStatus: 400, serverCode: "INVALID_PARAMETER_VALUE")
        let (settled, calls) = drain(&s) { sent in sent.metrics.contains { $0.key == "bad key" } ? refusal : nil }
        let dead = settled.flatMap(\.deadLetters)
        let deadPoints = dead.flatMap { letter -> [MetricPoint] in if case .log(let b) = letter.record { b.metrics } else { [] } }
        #expect(deadPoints.count == 50 && deadPoints.allSatisfy { $0.key == "bad key" })
        #expect(dead.allSatisfy { $0.runID == "r" && $0.refusal == refusal })
        #expect(settled.reduce(0) { $0 + $1.metrics } == 100)
        #expect(calls == 2)  // the merged batch, then the rest without the named key
        #expect(settled.flatMap(\.failures).count == 50)  // every record is told (it lost a point)
        #expect(s.settledUpTo == s.lastTicket && s.queuedEntries == 0)
    }

    @Test func aRefusalThatNamesNothingIsBisectedToTheOneRefusedEntity() throws {
        var s = scheduler()
        s.bind("a", .init(runID: "r", experimentID: nil))
        s.enqueue("a", .log(metrics(64)), now: 0)
        s.enqueue("a", .log(LogBatch(params: ["lr": "0.1"], tags: ["t": "x"])), now: 0)
        let refusal = SinkRefusal(ProtocolError(.sinkRejected, "MLflow answered 400 with a body that is not MLflow's error JSON: <html>"), httpStatus: 400)
        let (settled, calls) = drain(&s) { sent in sent.metrics.contains { $0.step == 37 } ? refusal : nil }
        let dead = settled.flatMap(\.deadLetters)
        #expect(dead.count == 1)
        #expect(dead.first?.record == .log(LogBatch(metrics: [MetricPoint(key: "m", value: 37, step: 37, timestamp: 1)])))
        #expect(settled.reduce(0) { $0 + $1.metrics } == 63)
        #expect(calls <= 2 * 7 + 1)  // log2(66) levels of halves
        #expect(s.settledUpTo == s.lastTicket)
    }

    @Test func anEntityNamedByItsIndexIsTheOneRefused() throws {
        let batch = LogBatch(
            metrics: [MetricPoint(key: "a", value: 1, step: 0, timestamp: 1), MetricPoint(key: "a", value: 2, step: 1, timestamp: 1)],
            params: ["p": "1", "q": "2"])
        let (refused, rest) = UploadScheduler.divide(batch, by: "Invalid value 'x' for parameter 'params[1].value'")
        #expect(refused == LogBatch(params: ["q": "2"]))
        #expect(rest == [LogBatch(metrics: batch.metrics, params: ["p": "1"])])
        let (metric, others) = UploadScheduler.divide(batch, by: "Invalid value for metrics[1]")
        #expect(metric == LogBatch(metrics: [batch.metrics[1]]))
        #expect(others.count == 1 && others[0].metrics == [batch.metrics[0]])
    }

    @Test func refusedCredentialsKeepTheRecordsAndNewOnesEndTheBackoff() throws {
        var s = scheduler()
        s.bind("a", .init(runID: "r", experimentID: nil))
        s.enqueue("a", .log(metrics(10)), now: 0)
        for attempt in 0..<3 {
            let batch = try take(&s, UInt64(attempt) * 10_000_000)
            let settled = s.finish(batch, .needsCredentials(reason: "401"), now: UInt64(attempt) * 10_000_000)
            #expect(settled.failures.isEmpty && settled.deadLetters.isEmpty && settled.tickets.isEmpty)
        }
        #expect(s.next(now: 20_000_001) == nil && s.queuedEntries == 1)  // backing off
        s.retryNow()
        let batch = try take(&s, 20_000_001)
        #expect(s.finish(batch, .applied, now: 20_000_001).metrics == 10)
        #expect(s.settledUpTo == s.lastTicket)
    }

    @Test func aRefusedRunIsNotSplit() throws {
        var s = scheduler()
        s.bind("a", .init(runID: "r", experimentID: nil))
        s.enqueue("a", .log(metrics(500)), now: 0)
        s.enqueue("a", .log(metrics(500, key: "n")), now: 0)
        let refusal = SinkRefusal(ProtocolError(.sinkRejected, "The run r must be in the 'active' state."), httpStatus: 400, refusesRun: true)
        let (settled, calls) = drain(&s) { _ in refusal }
        #expect(calls == 1)
        #expect(settled.flatMap(\.deadLetters).count == 1 && settled.flatMap(\.failures).count == 2)
    }

    @Test func aRunThatCannotBeCreatedSettlesAllItsRecordsAsFailed() throws {
        var s = scheduler()
        s.enqueue("a", .createRun(creation("a")), now: 0)
        s.enqueue("a", .log(metrics(1)), now: 0)
        s.enqueue("a", .updateRun(status: .finished, endTime: 1), now: 0)
        let create = try take(&s, 0)
        let settled = s.finish(create, .rejected(SinkRefusal(ProtocolError(.sinkRejected, "deleted experiment"))), now: 0)
        #expect(settled.failures.count == 3)
        #expect(settled.deadLetters.map(\.record) == [.createRun(creation("a")), .log(metrics(1)), .updateRun(status: .finished, endTime: 1)])
        #expect(s.failure(of: "a")?.message == "deleted experiment")
        #expect(s.next(now: 0) == nil && s.queuedEntries == 0)
    }

    @Test func logsWaitForTheFlushIntervalUnlessHurried() throws {
        var s = scheduler(flushNs: 1_000_000_000)
        s.bind("a", .init(runID: "r", experimentID: nil))
        let ticket = s.enqueue("a", .log(metrics(10)), now: 0)
        #expect(s.next(now: 10) == nil)
        #expect(s.nextWake(now: 10) == 1_000_000_000)
        #expect(s.next(now: 1_000_000_000) != nil)
        var t = scheduler(flushNs: 1_000_000_000)
        t.bind("a", .init(runID: "r", experimentID: nil))
        let other = t.enqueue("a", .log(metrics(10)), now: 0)
        t.hurry(upTo: other)
        #expect(t.next(now: 10) != nil)
        #expect(ticket == other)
    }

    @Test func settledUpToFollowsTheOldestUnsettledTicket() throws {
        var s = scheduler()
        s.bind("a", .init(runID: "a", experimentID: nil))
        s.bind("b", .init(runID: "b", experimentID: nil))
        s.enqueue("a", .updateRun(status: .finished, endTime: 1), now: 0)  // ticket 1
        s.enqueue("b", .updateRun(status: .finished, endTime: 1), now: 0)  // ticket 2
        let a = try take(&s, 0)
        let b = try take(&s, 0)
        _ = s.finish(b, .applied, now: 0)
        #expect(s.settledUpTo == 0)  // ticket 1 still in flight
        _ = s.finish(a, .applied, now: 0)
        #expect(s.settledUpTo == 2)
    }

    @Test func aRunsArtifactsGoOnParallelLanesAndWhatFollowsThemWaitsForAll() throws {
        var s = UploadScheduler(limits: .mlflow, flushIntervalNs: 0, artifactLanes: 2, backoffBaseNs: 1_000, backoffCapNs: 1_000_000)
        s.bind("a", .init(runID: "r1", experimentID: "1"))
        for path in ["x", "y", "x", "z"] { s.enqueue("a", .artifact(path: path, spoolPath: "/s/" + path), now: 0) }
        s.enqueue("a", .updateRun(status: .finished, endTime: 9), now: 0)
        let x = try take(&s, 0)
        let y = try take(&s, 0)
        #expect(x.operation == .artifact(runID: "r1", path: "x", spoolPath: "/s/x") && y.operation == .artifact(runID: "r1", path: "y", spoolPath: "/s/y"))
        #expect(s.next(now: 0) == nil && s.inFlight == 2)  // two lanes
        #expect(s.finish(y, .applied, now: 0).tickets == [2])
        // The second file of path x waits for the first: the later one must land last.
        #expect(s.next(now: 0) == nil)
        #expect(s.finish(x, .retry(after: nil, reason: "503"), now: 0, jitter: 0).tickets.isEmpty)
        // The retried one goes first again once its backoff is over.
        let again = try take(&s, 1_000_000)
        #expect(again.entries.map(\.ticket) == [1] && s.next(now: 1_000_000) == nil)
        #expect(s.finish(again, .applied, now: 1_000_000).tickets == [1])
        let secondX = try take(&s, 1_000_000)
        let z = try take(&s, 1_000_000)
        #expect(secondX.entries.map(\.ticket) == [3] && z.entries.map(\.ticket) == [4])
        // The end waits for every artifact before it.
        #expect(s.finish(z, .applied, now: 1_000_000).tickets == [4] && s.next(now: 1_000_000) == nil)
        #expect(s.finish(secondX, .applied, now: 1_000_000).tickets == [3])
        let end = try take(&s, 1_000_000)
        #expect(end.operation == .updateRun(runID: "r1", status: .finished, endTime: 9) && s.settledUpTo == 4)
    }

    @Test func withOneLaneArtifactsGoOneAtATime() throws {
        var s = scheduler()
        s.bind("a", .init(runID: "r1", experimentID: "1"))
        for path in ["x", "y"] { s.enqueue("a", .artifact(path: path, spoolPath: "/s/" + path), now: 0) }
        let x = try take(&s, 0)
        #expect(s.next(now: 0) == nil)
        _ = s.finish(x, .applied, now: 0)
        #expect(try take(&s, 0).entries.map(\.ticket) == [2])
    }
}

extension UploadScheduler.Batch: Equatable {
    public static func == (a: Self, b: Self) -> Bool { a.handle == b.handle && a.operation == b.operation }
}
