import Testing

@testable import ArmoryDaemon

/// The uploader's backlog without I/O: the spill (records on disk only) and what goes around it,
/// and the records in memory that say how far the journal is settled.
struct BacklogTests {
    @Test func aUserWithNothingInTheSpillGoesAroundItAndTheReadBackSkipsWhatWentAround() {
        var spill = Spill(firstUnloaded: 1, lastSpilled: 1)
        spill.add(1, handle: "a1", uid: 1)
        spill.add(2, handle: "a1", uid: 1)
        #expect(!spill.letsThrough("a1", uid: 1))
        #expect(!spill.letsThrough("a2", uid: 1))  // another run of the same user: behind its backlog
        #expect(spill.letsThrough("b1", uid: 2) && spill.letsThrough("m", uid: nil))
        spill.wentAround(3)
        spill.wentAround(4)
        spill.add(5, handle: "a2", uid: 1)
        spill.wentAround(6)
        #expect(Array(spill.around) == [3...4, 6...6] && spill.count == 3)
        // Read back in journal order: what went around is queued already.
        #expect(spill.takeBack(1, handle: "a1") && spill.takeBack(2, handle: "a1"))
        #expect(!spill.takeBack(3, handle: "b1") && !spill.takeBack(4, handle: "b1"))
        #expect(!spill.letsThrough("a1", uid: 1))  // a2 is still on disk
        #expect(spill.takeBack(5, handle: "a2") && !spill.takeBack(6, handle: "b1"))
        #expect(spill.count == 0 && spill.letsThrough("a1", uid: 1))
        // What a restart left on disk is not known per run: nothing goes around it.
        #expect(!Spill(firstUnloaded: 1, lastSpilled: 9, count: 9, handlesKnown: false).letsThrough("b1", uid: 2))
    }

    @Test func theOldestRecordStillWaitingBoundsTheWatermarkWhicheverDequeItIsIn() {
        var q = QueuedRecords()
        q.append(.init(ticket: 1, sequence: 10, bytes: 100, uid: 1), aroundSpill: false)
        // Records of another user went around a spill of sequence numbers 11...20.
        q.append(.init(ticket: 2, sequence: 21, bytes: 50, uid: 2), aroundSpill: true)
        q.append(.init(ticket: 3, sequence: 22, bytes: 50, uid: 2), aroundSpill: true)
        // The spill is read back later: higher tickets, lower sequence numbers.
        q.append(.init(ticket: 4, sequence: 11, bytes: 70, uid: 1), aroundSpill: false)
        #expect(q.bytes == 270 && q.held(by: 1) == 170 && q.held(by: 2) == 100 && q.held(by: nil) == 0)
        // An even share of 300 is 150 for two users, 100 for three.
        #expect(q.fitsInAShare(2, adding: 50, of: 300) && !q.fitsInAShare(2, adding: 51, of: 300) && !q.fitsInAShare(1, adding: 1, of: 300))
        #expect(q.fitsInAShare(3, adding: 100, of: 300) && !q.fitsInAShare(3, adding: 101, of: 300))
        #expect(q.oldestSequence == 10)
        #expect(q.count(upTo: 20) == 2 && q.count(upTo: 22) == 4)
        #expect(q.lastTicket(upTo: 21) == 4 && q.lastTicket(upTo: 9) == nil)

        // Those that went around settle first: their memory is given back, but they stay
        // until every ticket before them settled.
        #expect(q.release(2) == 21 && q.release(3) == 22 && q.release(3) == 22 && q.release(9) == nil)
        #expect(q.bytes == 170 && q.held(by: 1) == 170 && q.held(by: 2) == 0)  // given back once only
        q.dropSettled(upTo: 1)
        #expect(q.bytes == 70 && q.oldestSequence == 11)  // the read-back record, though a younger one settled
        q.dropSettled(upTo: 4)
        #expect(q.isEmpty && q.oldestSequence == nil && q.bytes == 0 && q.held(by: 1) == 0)
    }
}
