import Testing

@testable import ArmoryDaemon

/// The records in memory that say how far the journal is settled: those read in journal order
/// and those that went around a spill, each in ticket and sequence order.
struct QueuedRecordsTests {
    @Test func theOldestRecordStillWaitingBoundsTheWatermarkWhicheverDequeItIsIn() {
        var q = QueuedRecords()
        q.append(.init(ticket: 1, sequence: 10, bytes: 100), aroundSpill: false)
        // Records of another user went around a spill of sequence numbers 11...20.
        q.append(.init(ticket: 2, sequence: 21, bytes: 50), aroundSpill: true)
        q.append(.init(ticket: 3, sequence: 22, bytes: 50), aroundSpill: true)
        // The spill is read back later: higher tickets, lower sequence numbers.
        q.append(.init(ticket: 4, sequence: 11, bytes: 70), aroundSpill: false)
        #expect(q.oldestSequence == 10)
        #expect(q.count(upTo: 20) == 2 && q.count(upTo: 22) == 4)
        #expect(q.lastTicket(upTo: 21) == 4 && q.lastTicket(upTo: 9) == nil)

        // Those that went around settle first: their memory is given back, but they stay
        // until every ticket before them settled.
        #expect(q.release(2) == 50 && q.release(3) == 50 && q.release(3) == 0)
        #expect(q.dropSettled(upTo: 1) == 100)
        #expect(q.oldestSequence == 11)  // the read-back record, though a younger one settled
        #expect(q.dropSettled(upTo: 4) == 70)
        #expect(q.isEmpty && q.oldestSequence == nil)
    }
}
