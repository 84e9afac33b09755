import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// Host and per-process figures under MLflow's `system/...` names (those of its
/// `SystemMetricsMonitor`), from `/proc`, `statvfs` and, where present, NVIDIA's NVML. CPU figures
/// are rates between two samples, so the sampler keeps the previous counters.
public struct SystemSampler: Sendable {
    /// What the host looked like at one sample.
    public struct Host: Sendable, Equatable {
        /// MLflow's names (without `system/`) and values, network counters excepted.
        public var metrics: [String: Double]
        /// Bytes received and sent since boot (runs report them relative to their first sample).
        public var networkReceived: UInt64
        public var networkSent: UInt64
    }

    private let root: String
    private let diskPath: String
    private let ticksPerSecond: Double
    private let gpus: NVML?
    private var lastCPU: ProcFiles.CPUTimes?
    private var lastProcess: [Int32: (ticks: UInt64, at: Double)] = [:]

    /// `root`: where `/proc` is (tests pass a directory of recorded files); `diskPath`: the file
    /// system whose usage is reported (the daemon's state directory).
    public init(root: String = "", diskPath: String, gpus: NVML? = NVML.load()) {
        self.root = root
        self.diskPath = diskPath
        self.gpus = gpus
        ticksPerSecond = Double(max(1, sysconf(Int32(_SC_CLK_TCK))))
    }

    public var hasGPUs: Bool { gpus != nil }

    public mutating func sampleHost() -> Host {
        var metrics: [String: Double] = [:]
        if let cpu = ProcFiles.cpuTimes(stat: read("/proc/stat")) {
            if let last = lastCPU, cpu.total > last.total {
                let busy = Double((cpu.total - last.total) - min(cpu.idle - min(cpu.idle, last.idle), cpu.total - last.total))
                metrics["cpu_utilization_percentage"] = Self.round1(busy / Double(cpu.total - last.total) * 100)
            }
            lastCPU = cpu
        }
        if let memory = ProcFiles.memory(meminfo: read("/proc/meminfo")), memory.totalKB > 0 {
            metrics["system_memory_usage_megabytes"] = Self.round1(Double(memory.usedKB) * 1024 / 1e6)
            metrics["system_memory_usage_percentage"] = Self.round1(Double(memory.usedKB) / Double(memory.totalKB) * 100)
        }
        var disk = statvfs()
        if statvfs(diskPath, &disk) == 0 {
            let block = Double(disk.f_frsize)
            let used = Double(disk.f_blocks - disk.f_bfree) * block
            let free = Double(disk.f_bavail) * block
            metrics["disk_usage_megabytes"] = Self.round1(used / 1e6)
            metrics["disk_available_megabytes"] = Self.round1(free / 1e6)
            if used + free > 0 { metrics["disk_usage_percentage"] = Self.round1(used / (used + free) * 100) }
        }
        for (index, device) in (gpus?.devices() ?? []).enumerated() {
            for (name, value) in device { metrics["gpu_\(index)_\(name)"] = Self.round1(value) }
        }
        let network = ProcFiles.networkBytes(netDev: read("/proc/net/dev")) ?? (0, 0)
        return Host(metrics: metrics, networkReceived: network.received, networkSent: network.sent)
    }

    /// A client process's CPU (percent of one core since its previous sample), RSS and threads;
    /// nil when the process is gone. `now`: seconds on a monotonic clock.
    public mutating func sampleProcess(_ pid: Int32, now: Double) -> [String: Double]? {
        guard let process = ProcFiles.process(stat: read("/proc/\(pid)/stat"), status: read("/proc/\(pid)/status")) else {
            lastProcess[pid] = nil
            return nil
        }
        var metrics = ["process_memory_rss_megabytes": Self.round1(Double(process.rssKB) * 1024 / 1e6), "process_threads": Double(process.threads)]
        if let last = lastProcess[pid], now > last.at, process.cpuTicks >= last.ticks {
            metrics["process_cpu_utilization_percentage"] = Self.round1(Double(process.cpuTicks - last.ticks) / ticksPerSecond / (now - last.at) * 100)
        }
        lastProcess[pid] = (process.cpuTicks, now)
        return metrics
    }

    /// Forgets processes no longer sampled.
    public mutating func keepProcesses(_ pids: Set<Int32>) {
        lastProcess = lastProcess.filter { pids.contains($0.key) }
    }

    private func read(_ path: String) -> String {
        (try? String(contentsOfFile: root + path, encoding: .utf8)) ?? ""
    }

    static func round1(_ value: Double) -> Double { (value * 10).rounded() / 10 }
}
