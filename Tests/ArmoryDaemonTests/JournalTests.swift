import ArmoryProtocol
import Foundation
import Synchronization
import Testing

@testable import ArmoryDaemon

@Suite struct JournalCodecTests {
    static let creation: RunCreation = {
        var c = RunCreation(
            handle: "h1", runID: "r1", experimentName: "exp", name: "run", userID: "alice", startTime: 1_700_000_000_000,
            tags: ["mlflow.user": "alice", "armory.handle": "h1"], parentHandle: "h0")
        c.ownerUID = 1000
        c.clientPID = 4242
        return c
    }()

    static let entries: [JournalEntry] = [
        .record(handle: "h1", .createRun(creation)),
        .record(
            handle: "h1",
            .log(
                LogBatch(
                    metrics: [MetricPoint(key: "loss", value: .nan, step: 3, timestamp: 17), MetricPoint(key: "acc/é", value: -.infinity, step: -1, timestamp: 18)],
                    params: ["lr": "0.1"], tags: ["t": ""]))),
        .record(handle: "h1", .updateRun(status: .finished, endTime: 99)),
        .record(handle: "h1", .updateRun(status: .running, endTime: nil)),
        .record(handle: "h1", .artifact(path: "a/b.txt", spoolPath: "/s/x")),
        .record(handle: "h1", .deleteTag(key: "draft")),
        .bind(handle: "h1", runID: "abc", experimentID: nil),
        .settled(12),
        .run(
            RunEntry(
                handle: "h2", runID: nil, experimentID: "3", experimentName: "e", name: "n", ownerUID: 7, status: .killed, parentHandle: nil,
                params: ["a": "b"], connection: nil, clientPID: 9)),
    ]

    @Test func everyEntryRoundTrips() throws {
        var bytes = JournalSegment.magic
        for (i, entry) in Self.entries.enumerated() {
            var w = JournalFieldWriter()
            JournalCodec.encode(entry, into: &w)
            JournalSegment.frame(lsn: UInt64(i + 1), body: w.bytes, into: &bytes)
        }
        let scan = JournalSegment.scan(bytes)
        #expect(scan.corrupt == 0 && scan.tornBytes == 0)
        #expect(scan.entries.map(\.lsn) == Array(1...UInt64(Self.entries.count)))
        #expect(scan.entries.map(\.entry) == Self.entries)
    }

    func segment(_ count: Int) -> ([UInt8], [Int]) {
        var bytes = JournalSegment.magic
        var offsets: [Int] = []
        for i in 0..<count {
            offsets.append(bytes.count)
            var w = JournalFieldWriter()
            JournalCodec.encode(.record(handle: "h", .log(LogBatch(metrics: [MetricPoint(key: "m", value: Double(i), timestamp: Int64(i))]))), into: &w)
            JournalSegment.frame(lsn: UInt64(i + 1), body: w.bytes, into: &bytes)
        }
        return (bytes, offsets)
    }

    @Test func aTornTailIsCutOffEveryWhereItCanBeCut() {
        let (bytes, offsets) = segment(3)
        for cut in (offsets[2] + 1)..<bytes.count {
            let scan = JournalSegment.scan(Array(bytes[0..<cut]))
            #expect(scan.entries.count == 2)
            #expect(scan.validLength == offsets[2])
            #expect(scan.tornBytes == cut - offsets[2])
            #expect(scan.corrupt == 0)
        }
    }

    @Test func aCorruptRecordInTheMiddleIsSkippedAndCounted() {
        var (bytes, offsets) = segment(3)
        bytes[offsets[1] + 20] ^= 0xFF
        let scan = JournalSegment.scan(bytes)
        #expect(scan.corrupt == 1)
        #expect(scan.entries.map(\.lsn) == [1, 3])
        #expect(scan.tornBytes == 0)
    }

    @Test func aDamagedLengthStopsTheSegment() {
        var (bytes, offsets) = segment(3)
        bytes[offsets[1] + 3] = 0xFF  // length now ≫ the limit
        let scan = JournalSegment.scan(bytes)
        #expect(scan.entries.map(\.lsn) == [1])
        #expect(scan.corrupt == 1)
    }

    @Test func crcMatchesTheStandardCheckValue() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
    }
}

@Suite struct JournalStateTests {
    @Test func replayKeepsRunsAndOnlyUnsettledRecords() {
        var state = JournalState(collectPending: true)
        state.apply(.record(handle: "h1", .createRun(JournalCodecTests.creation)), lsn: 1)
        state.apply(.record(handle: "h1", .log(LogBatch(params: ["a": "1"]))), lsn: 2)
        state.apply(.bind(handle: "h1", runID: "server-id", experimentID: "5"), lsn: 3)
        state.apply(.record(handle: "h1", .log(LogBatch(metrics: [MetricPoint(key: "m", value: 1, timestamp: 1)]))), lsn: 4)
        state.apply(.settled(3), lsn: 5)
        #expect(state.runs["h1"]?.runID == "server-id")
        #expect(state.runs["h1"]?.ownerUID == 1000)
        #expect(state.runs["h1"]?.params == ["a": "1"])
        #expect(state.unsettled.map(\.lsn) == [4])
        state.apply(.record(handle: "h1", .updateRun(status: .finished, endTime: 5)), lsn: 6)
        state.prune()
        #expect(state.runs["h1"] != nil)  // its end is not settled yet
        state.apply(.settled(6), lsn: 7)
        state.prune()
        #expect(state.runs.isEmpty)
    }
}

@Suite struct JournalFileTests {
    func directory() -> String { NSTemporaryDirectory() + "armory-journal-" + UUID().uuidString }

    func durable(_ journal: Journal, _ lsn: UInt64) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in journal.whenDurable(lsn, urgent: true) { c.resume() } }
    }

    @Test func recordsSurviveAReopenAndSettledOnesAreNotReplayed() async throws {
        let dir = directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (journal, first) = try Journal.open(directory: dir, options: .init())
        #expect(first.state.unsettled.isEmpty)
        _ = journal.append(.record(handle: "h1", .createRun(JournalCodecTests.creation))).lsn
        let second = journal.append(.record(handle: "h1", .log(LogBatch(metrics: [MetricPoint(key: "m", value: 2, timestamp: 2)])))).lsn
        journal.recordSettled(upTo: 1)
        let third = journal.append(.record(handle: "h1", .log(LogBatch(metrics: [MetricPoint(key: "m", value: 3, timestamp: 3)])))).lsn
        await durable(journal, third)
        journal.close()
        let (again, recovery) = try Journal.open(directory: dir)
        defer { again.close() }
        #expect(recovery.state.unsettled.map(\.lsn) == [second, third])
        #expect(recovery.state.runs["h1"]?.runID == "r1")
        // Numbering goes on (a settle mark written at close may already have taken the next number).
        #expect(again.append(.record(handle: "h1", .log(LogBatch(metrics: [MetricPoint(key: "m", value: 4, timestamp: 4)])))).lsn > third)
    }

    @Test func aTornFileTailIsTruncatedOnOpen() async throws {
        let dir = directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (journal, _) = try Journal.open(directory: dir)
        let lsn = journal.append(.record(handle: "h1", .createRun(JournalCodecTests.creation))).lsn
        await durable(journal, lsn)
        journal.close()
        let segment = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasPrefix("segment-") }.sorted().last!
        let handle = FileHandle(forWritingAtPath: dir + "/" + segment)!
        handle.seekToEndOfFile()
        handle.write(Data([0x40, 0, 0, 0, 1, 2, 3]))  // half a record
        handle.closeFile()
        let (again, recovery) = try Journal.open(directory: dir)
        again.close()
        #expect(recovery.truncatedBytes == 7)
        #expect(recovery.state.unsettled.map(\.lsn) == [lsn])
    }

    @Test func settledSegmentsAreDeleted() async throws {
        let dir = directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (journal, _) = try Journal.open(directory: dir, options: .init(commitInterval: 0, segmentBytes: 512))
        var last: UInt64 = 0
        for i in 0..<50 {
            last = journal.append(.record(handle: "h1", .log(LogBatch(metrics: [MetricPoint(key: "metric", value: Double(i), timestamp: Int64(i))])))).lsn
            await durable(journal, last)
        }
        #expect(journal.snapshotStatistics.segments > 3)
        journal.recordSettled(upTo: last)
        for i in 0..<5 {  // a few commits: the watermark is recorded, then old segments go
            await durable(journal, journal.append(.record(handle: "h1", .log(LogBatch(metrics: [MetricPoint(key: "m", value: 0, timestamp: Int64(i))])))).lsn)
        }
        #expect(journal.snapshotStatistics.segments <= 2)
        journal.close()
        let (again, recovery) = try Journal.open(directory: dir)
        again.close()
        #expect(recovery.state.unsettled.allSatisfy { $0.lsn > last })
    }
}

@Suite struct UploaderJournalTests {
    @Test func pastTheMemoryBoundRecordsWaitInTheJournalAndAllLandInOrder() async throws {
        let dir = NSTemporaryDirectory() + "armory-spill-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let sink = try FileStoreSink(root: dir + "/mlruns")
        let (journal, _) = try Journal.open(directory: dir + "/journal", options: .init(commitInterval: 0.001, segmentBytes: 64 << 10))
        let uploader = Uploader(sink: sink, bounds: .init(memoryBytes: 16 << 10), journal: journal)
        var creation = JournalCodecTests.creation
        creation.runID = "spillrun"
        creation.parentHandle = nil
        uploader.enqueue("h1", .createRun(creation))
        var last: UInt64 = 0
        for i in 0..<3000 {
            last = uploader.enqueue("h1", .log(LogBatch(metrics: [MetricPoint(key: "m", value: Double(i), step: Int64(i), timestamp: Int64(i))]))).ticket
        }
        // Not started yet: nearly everything is in the journal only.
        #expect(uploader.counterSnapshot.spilledRecords > 2500)
        #expect(uploader.pending(upTo: last) == 3001)
        uploader.start()
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in uploader.whenSettled(upTo: last) { c.resume() } }
        #expect(uploader.counterSnapshot.spilledRecords == 0)
        #expect(uploader.counterSnapshot.metricsWritten == 3000)
        let experiment = try #require(try FileManager.default.contentsOfDirectory(atPath: dir + "/mlruns").first { FileManager.default.fileExists(atPath: dir + "/mlruns/" + $0 + "/spillrun") })
        let file = try String(contentsOfFile: dir + "/mlruns/" + experiment + "/spillrun/metrics/m", encoding: .utf8)
        #expect(file.split(separator: "\n").map { Int($0.split(separator: " ")[2])! } == Array(0..<3000))
        _ = await uploader.shutdown(timeout: 5)
    }

    @Test func aRunWithNothingSpilledGoesAroundAnotherRunsBacklogOnDisk() async throws {
        let dir = NSTemporaryDirectory() + "armory-around-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let sink = GatedSink(try FileStoreSink(root: dir + "/mlruns"), holdsLogsOf: "flood")
        let (journal, _) = try Journal.open(directory: dir + "/journal", options: .init(commitInterval: 0.001, segmentBytes: 64 << 10))
        let uploader = Uploader(sink: sink, bounds: .init(memoryBytes: 16 << 10), journal: journal)
        func creation(_ runID: String) -> RunCreation {
            var c = JournalCodecTests.creation
            c.runID = runID
            c.parentHandle = nil
            return c
        }
        func points(_ key: String, _ range: Range<Int>) -> SinkRecord {
            .log(LogBatch(metrics: range.map { MetricPoint(key: key, value: Double($0), step: Int64($0), timestamp: Int64($0)) }))
        }
        // Run A: batches of 200 points, past the memory bound at once: all of them spill.
        uploader.enqueue("a", .createRun(creation("flood")))
        var lastOfA: UInt64 = 0
        for batch in 0..<40 { lastOfA = uploader.enqueue("a", points("m", batch * 200..<(batch + 1) * 200)).ticket }
        let firstOfA = lastOfA - 39
        #expect(uploader.counterSnapshot.spilledRecords == 40)
        // Run B has nothing on disk: its records go around A's backlog, in memory.
        uploader.enqueue("b", .createRun(creation("stream")))
        let landed = Mutex<[Int]>([])
        for i in 0..<20 {
            uploader.enqueue("b", points("n", i..<i + 1)) { result in
                if case .success = result { landed.withLock { $0.append(i) } }
            }
        }
        #expect(uploader.counterSnapshot.spilledRecords == 40)
        uploader.start()
        // B lands while A's calls are held back and its backlog waits on disk.
        let deadline = ContinuousClock.now + .seconds(30)
        while landed.withLock({ $0.count }) < 20 && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(landed.withLock { $0 } == Array(0..<20))
        #expect(uploader.counterSnapshot.spilledRecords > 0)  // (what memory holds of it is held at the sink)
        // The journal's watermark stays below A's oldest record: a restart now would send it all.
        #expect(journal.snapshotStatistics.settledLSN < firstOfA)
        #expect(uploader.pending(upTo: lastOfA) >= 40)
        sink.open()
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in uploader.whenSettled(upTo: uploader.lastTicket) { c.resume() } }
        #expect(uploader.counterSnapshot.spilledRecords == 0)
        #expect(uploader.counterSnapshot.metricsWritten == 8000 + 20)
        for (runID, key, count) in [("flood", "m", 8000), ("stream", "n", 20)] {
            let experiment = try #require(try FileManager.default.contentsOfDirectory(atPath: dir + "/mlruns").first { FileManager.default.fileExists(atPath: dir + "/mlruns/" + $0 + "/" + runID) })
            let file = try String(contentsOfFile: dir + "/mlruns/" + experiment + "/" + runID + "/metrics/" + key, encoding: .utf8)
            #expect(file.split(separator: "\n").map { Int($0.split(separator: " ")[2])! } == Array(0..<count))
        }
        _ = await uploader.shutdown(timeout: 5)
    }

    @Test func aReplayPastItsMemoryBudgetReadsTheRestBackFromDisk() async throws {
        let dir = NSTemporaryDirectory() + "armory-replay-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var creation = JournalCodecTests.creation
        creation.runID = "replayrun"
        creation.parentHandle = nil
        do {
            let (journal, _) = try Journal.open(directory: dir + "/journal", options: .init(segmentBytes: 32 << 10))
            journal.append(.record(handle: "h1", .createRun(creation)))
            var last: UInt64 = 0
            for i in 0..<3000 {
                last = journal.append(.record(handle: "h1", .log(LogBatch(metrics: [MetricPoint(key: "m", value: Double(i), step: Int64(i), timestamp: Int64(i))])))).lsn
            }
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in journal.whenDurable(last, urgent: true) { c.resume() } }
            journal.close()
        }
        let (journal, recovery) = try Journal.open(directory: dir + "/journal", replayBytes: 8 << 10)
        #expect(recovery.state.unsettled.count < 200)
        #expect((recovery.state.leftOnDisk?.count ?? 0) + recovery.state.unsettled.count == 3001)
        let uploader = Uploader(sink: try FileStoreSink(root: dir + "/mlruns"), bounds: .init(memoryBytes: 16 << 10), journal: journal)
        // Started first, as the daemon does: the replay alone must set the sender going (no new
        // record, no flush, wakes it here).
        uploader.start()
        uploader.replay(recovery)
        let deadline = ContinuousClock.now + .seconds(30)
        while uploader.counterSnapshot.metricsWritten < 3000 && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        #expect(uploader.counterSnapshot.metricsWritten == 3000)
        _ = await uploader.shutdown(timeout: 5)
    }
}

/// A sink that holds back the metric calls of one run until `open()` (the rest goes through),
/// with room for calls of several runs at once.
final class GatedSink: RecordSink {
    private let inner: FileStoreSink
    private let heldRunID: String
    private let isOpen = Atomic<Bool>(false)

    init(_ inner: FileStoreSink, holdsLogsOf runID: String) {
        self.inner = inner
        heldRunID = runID
    }

    func open() { isOpen.store(true, ordering: .relaxed) }

    var destination: String { inner.destination }
    var concurrency: Int { 4 }
    var limits: BatchLimits { inner.limits }
    var defaultFlushInterval: Double { 0 }
    var assignsRunIDs: Bool { true }

    func perform(_ operation: SinkOperation) async -> SinkOutcome {
        if case .log(let runID, _) = operation, runID == heldRunID {
            while !isOpen.load(ordering: .relaxed) { try? await Task.sleep(for: .milliseconds(2)) }
        }
        return await inner.perform(operation)
    }

    func findRun(runID: String) async -> StoredRun? { await inner.findRun(runID: runID) }
    func experiment(named name: String, create: Bool) async throws(ProtocolError) -> String? { try await inner.experiment(named: name, create: create) }
    func setExperimentTag(experimentID: String, key: String, value: String) async throws(ProtocolError) {
        try await inner.setExperimentTag(experimentID: experimentID, key: key, value: value)
    }
    func close() async { await inner.close() }
}
