import DequeModule

/// The uploader's records in memory, by scheduler ticket and journal sequence number: what says
/// how far the journal is settled (docs/architecture.md, "Backpressure and fair shares").
///
/// Records normally enter in journal order. While a spill waits on disk, a run with nothing in it
/// may go around it: its records enter `around`, with sequence numbers above the spilled ones that
/// are read back into `inOrder` later. Each deque stays in ticket and in sequence order, so the
/// oldest unsettled record is at the front of one of them.
struct QueuedRecords {
    /// A record in memory: its last scheduler ticket, journal sequence number, footprint (0 once
    /// its memory was given back) and the user it came from (nil: a sync's, or not known).
    struct Entry {
        var ticket: UInt64
        var sequence: UInt64
        var bytes: Int
        var uid: UInt32?
    }

    private(set) var inOrder = Deque<Entry>()
    private(set) var around = Deque<Entry>()
    /// The memory the records hold, in all and per user (a list: users are few, and a lookup
    /// per record costs less than hashing).
    private(set) var bytes = 0
    private var bytesByUser: [(uid: UInt32?, bytes: Int)] = []

    var isEmpty: Bool { inOrder.isEmpty && around.isEmpty }

    mutating func append(_ entry: Entry, aroundSpill: Bool) {
        if aroundSpill { around.append(entry) } else { inOrder.append(entry) }
        add(entry.bytes, of: entry.uid)
    }

    /// The memory `uid`'s records hold.
    func held(by uid: UInt32?) -> Int {
        bytesByUser.first { $0.uid == uid }?.bytes ?? 0
    }

    private mutating func add(_ delta: Int, of uid: UInt32?) {
        bytes += delta
        guard let index = bytesByUser.firstIndex(where: { $0.uid == uid }) else { return bytesByUser.append((uid, delta)) }
        bytesByUser[index].bytes += delta
        if bytesByUser[index].bytes <= 0 { bytesByUser.remove(at: index) }
    }

    /// Whether `bytes` more of `uid`'s stay within its even share of `bound` among the users with
    /// records in memory (itself included): a light user, whose record may take the room past
    /// the bound that heavier users filled.
    func fitsInAShare(_ uid: UInt32?, adding bytes: Int, of bound: Int) -> Bool {
        let held = held(by: uid)
        let users = bytesByUser.count + (held == 0 ? 1 : 0)
        return held + bytes <= bound / users
    }

    private mutating func giveBack(_ entry: Entry) {
        if entry.bytes > 0 { add(-entry.bytes, of: entry.uid) }
    }

    /// Gives back the memory of the record whose last ticket is `ticket`, settled ahead of older
    /// ones: its sequence number (nil for a ticket of an earlier piece of a split record).
    mutating func release(_ ticket: UInt64) -> UInt64? {
        if let index = Self.index(of: ticket, in: inOrder) {
            giveBack(inOrder[index])
            inOrder[index].bytes = 0
            return inOrder[index].sequence
        }
        if let index = Self.index(of: ticket, in: around) {
            giveBack(around[index])
            around[index].bytes = 0
            return around[index].sequence
        }
        return nil
    }

    private static func index(of ticket: UInt64, in entries: Deque<Entry>) -> Int? {
        var low = entries.startIndex
        var high = entries.endIndex
        while low < high {
            let mid = (low + high) / 2
            if entries[mid].ticket < ticket { low = mid + 1 } else { high = mid }
        }
        return low < entries.endIndex && entries[low].ticket == ticket ? low : nil
    }

    /// Drops the records whose tickets are all settled (every ticket up to `ticket` is), giving
    /// back the memory they still held.
    mutating func dropSettled(upTo ticket: UInt64) {
        while let first = inOrder.first, first.ticket <= ticket { giveBack(inOrder.removeFirst()) }
        while let first = around.first, first.ticket <= ticket { giveBack(around.removeFirst()) }
    }

    /// The sequence number of the oldest record still in memory.
    var oldestSequence: UInt64? {
        switch (inOrder.first?.sequence, around.first?.sequence) {
        case (let a?, let b?): min(a, b)
        case (let a, let b): a ?? b
        }
    }

    /// How many records up to sequence number `sequence` are in memory.
    func count(upTo sequence: UInt64) -> Int {
        inOrder.reduce(0) { $0 + ($1.sequence <= sequence ? 1 : 0) } + around.reduce(0) { $0 + ($1.sequence <= sequence ? 1 : 0) }
    }

    /// The sequence number of the record a ticket belongs to (a split record's tickets are
    /// consecutive and its entry holds the last): the entry with the smallest ticket at or above.
    func sequence(holding ticket: UInt64) -> UInt64? {
        func first(in entries: Deque<Entry>) -> Entry? {
            var low = entries.startIndex
            var high = entries.endIndex
            while low < high {
                let mid = (low + high) / 2
                if entries[mid].ticket < ticket { low = mid + 1 } else { high = mid }
            }
            return low < entries.endIndex ? entries[low] : nil
        }
        switch (first(in: inOrder), first(in: around)) {
        case (let a?, let b?): return a.ticket < b.ticket ? a.sequence : b.sequence
        case (let a, let b): return (a ?? b)?.sequence
        }
    }

    /// The last ticket of the records up to sequence number `sequence`.
    func lastTicket(upTo sequence: UInt64) -> UInt64? {
        let inOrderTicket = inOrder.last { $0.sequence <= sequence }?.ticket
        guard let aroundTicket = around.last(where: { $0.sequence <= sequence })?.ticket else { return inOrderTicket }
        return max(inOrderTicket ?? 0, aroundTicket)
    }
}
