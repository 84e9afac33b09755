/// Parsers of the `/proc` files the system-metrics sampler reads; pure functions over their text.
public enum ProcFiles {
    /// The first line of `/proc/stat`: all CPU time and the idle part (idle + iowait), in ticks.
    public struct CPUTimes: Sendable, Equatable {
        public var total: UInt64
        public var idle: UInt64
    }

    /// `/proc/meminfo`'s figures, in kB.
    public struct Memory: Sendable, Equatable {
        public var totalKB: UInt64
        public var freeKB: UInt64
        public var availableKB: UInt64
        public var buffersKB: UInt64
        /// `Cached` + `SReclaimable`, as psutil counts it.
        public var cachedKB: UInt64

        /// Used memory as psutil (and so MLflow's monitor) computes it: total − free − cached − buffers.
        public var usedKB: UInt64 {
            let reclaimable = freeKB + cachedKB + buffersKB
            return totalKB >= reclaimable ? totalKB - reclaimable : totalKB - min(totalKB, freeKB)
        }
    }

    /// One process's `/proc/<pid>/stat` and `/proc/<pid>/status` figures.
    public struct Process: Sendable, Equatable {
        /// utime + stime, in clock ticks.
        public var cpuTicks: UInt64
        public var rssKB: UInt64
        public var threads: Int
    }

    public static func cpuTimes(stat: String) -> CPUTimes? {
        guard let line = stat.split(separator: "\n").first(where: { $0.hasPrefix("cpu ") }) else { return nil }
        let fields = line.split(separator: " ").dropFirst().compactMap { UInt64($0) }
        guard fields.count >= 4 else { return nil }
        // user nice system idle iowait irq softirq steal (guest time is already in user).
        let counted = fields.prefix(8)
        return CPUTimes(total: counted.reduce(0, +), idle: fields[3] + (fields.count > 4 ? fields[4] : 0))
    }

    public static func memory(meminfo: String) -> Memory? {
        var values: [Substring: UInt64] = [:]
        for line in meminfo.split(separator: "\n") {
            let parts = line.split(separator: " ", omittingEmptySubsequences: true)
            guard parts.count >= 2, let value = UInt64(parts[1]) else { continue }
            values[parts[0].dropLast()] = value  // "MemTotal:" → "MemTotal"
        }
        guard let total = values["MemTotal"], let free = values["MemFree"] else { return nil }
        return Memory(
            totalKB: total, freeKB: free, availableKB: values["MemAvailable"] ?? free, buffersKB: values["Buffers"] ?? 0,
            cachedKB: (values["Cached"] ?? 0) + (values["SReclaimable"] ?? 0))
    }

    /// Bytes received and sent over all interfaces (what psutil's `net_io_counters()` sums).
    public static func networkBytes(netDev: String) -> (received: UInt64, sent: UInt64)? {
        var received: UInt64 = 0
        var sent: UInt64 = 0
        var interfaces = 0
        for line in netDev.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let fields = line[line.index(after: colon)...].split(separator: " ").compactMap { UInt64($0) }
            guard fields.count >= 9 else { continue }
            received += fields[0]
            sent += fields[8]
            interfaces += 1
        }
        return interfaces > 0 ? (received, sent) : nil
    }

    /// `/proc/<pid>/stat` (CPU ticks) and `/proc/<pid>/status` (RSS, threads). The command name
    /// may hold spaces and parentheses: fields are counted after its last `)`.
    public static func process(stat: String, status: String) -> Process? {
        guard let close = stat.lastIndex(of: ")") else { return nil }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        // After the name: state(0) ppid … utime(11) stime(12).
        guard fields.count > 12, let utime = UInt64(fields[11]), let stime = UInt64(fields[12]) else { return nil }
        var rss: UInt64 = 0
        var threads = 0
        for line in status.split(separator: "\n") {
            let parts = line.split(separator: " ", omittingEmptySubsequences: true).flatMap { $0.split(separator: "\t") }
            if line.hasPrefix("VmRSS:"), parts.count >= 2 { rss = UInt64(parts[1]) ?? 0 }
            if line.hasPrefix("Threads:"), parts.count >= 2 { threads = Int(parts[1]) ?? 0 }
        }
        return Process(cpuTicks: utime + stime, rssKB: rss, threads: threads)
    }
}
