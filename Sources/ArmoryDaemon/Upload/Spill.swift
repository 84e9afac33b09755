import DequeModule

/// Records that are in the journal only, waiting to be read back. A run of a user with
/// nothing in it goes around it (its records stay in memory), so that one user's backlog on
/// disk holds no other user back (docs/architecture.md, "Backpressure and fair shares").
struct Spill: Sendable {
    var firstUnloaded: UInt64
    var lastSpilled: UInt64
    var count = 0
    var position: Journal.Position?
    var loading = false
    /// Spilled records per run handle, and the user they came from.
    var handles: [String: (count: Int, uid: UInt32?)] = [:]
    /// Runs with spilled records per user.
    var uids: [UInt32: Int] = [:]
    /// Whether `handles` knows every spilled record: not for what a restart left on disk.
    var handlesKnown = true
    /// The sequence numbers of records that went around, ascending: skipped when reading back.
    var around = Deque<ClosedRange<UInt64>>()

    /// Whether a record of run `handle` from `uid` may go around the spill: nothing of its
    /// run, and nothing of its user, is in it.
    func letsThrough(_ handle: String, uid: UInt32?) -> Bool {
        handlesKnown && handles[handle] == nil && uid.map { uids[$0] == nil } ?? true
    }

    mutating func add(_ lsn: UInt64, handle: String, uid: UInt32?) {
        lastSpilled = lsn
        count += 1
        var entry = handles[handle] ?? (0, nil)
        entry.count += 1
        if entry.uid == nil, let uid {
            entry.uid = uid
            uids[uid, default: 0] += 1
        }
        handles[handle] = entry
    }

    mutating func wentAround(_ lsn: UInt64) {
        if let last = around.last, last.upperBound + 1 == lsn {
            around[around.count - 1] = last.lowerBound...lsn
        } else {
            around.append(lsn...lsn)
        }
    }

    /// A record read back from the journal: whether it was spilled (else it went around and
    /// is queued already).
    mutating func takeBack(_ lsn: UInt64, handle: String) -> Bool {
        while let first = around.first, first.upperBound < lsn { around.removeFirst() }
        if around.first?.contains(lsn) == true { return false }
        count -= 1
        guard var entry = handles[handle] else { return true }
        entry.count -= 1
        handles[handle] = entry.count > 0 ? entry : nil
        if entry.count == 0, let uid = entry.uid {
            let runs = (uids[uid] ?? 1) - 1
            uids[uid] = runs > 0 ? runs : nil
        }
        return true
    }
}
