/// Events per second over the last few whole seconds: a ring of per-second counts (what
/// `armoryctl status` shows as the upload rate).
public struct RateWindow: Sendable, Equatable {
    private var counts: [UInt64]
    private var slotSecond: [Int64]

    public init(seconds: Int = 10) {
        counts = Array(repeating: 0, count: max(1, seconds))
        slotSecond = Array(repeating: -1, count: max(1, seconds))
    }

    public mutating func add(_ n: UInt64, atMs ms: Int64) {
        let second = ms / 1000
        let i = Int(second % Int64(counts.count))
        if slotSecond[i] != second {
            slotSecond[i] = second
            counts[i] = 0
        }
        counts[i] += n
    }

    /// The mean rate over the window that ends at `ms` (the current second included).
    public func perSecond(atMs ms: Int64) -> Double {
        let second = ms / 1000
        let oldest = second - Int64(counts.count) + 1
        let total = zip(counts, slotSecond).reduce(UInt64(0)) { $0 + ($1.1 >= oldest && $1.1 <= second ? $1.0 : 0) }
        return Double(total) / Double(counts.count)
    }
}
