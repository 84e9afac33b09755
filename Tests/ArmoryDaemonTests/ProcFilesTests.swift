import Foundation
import Testing

@testable import ArmoryDaemon

/// The sampler's parsers against `/proc` files recorded on this machine (Fixtures/proc).
@Suite struct ProcFilesTests {
    static func fixture(_ name: String) throws -> String {
        try String(contentsOfFile: URL(fileURLWithPath: #filePath).deletingLastPathComponent().path + "/Fixtures/proc/" + name, encoding: .utf8)
    }

    @Test func cpuTimesAreTheFirstLinesCountersWithIowaitAsIdle() throws {
        let times = try #require(ProcFiles.cpuTimes(stat: Self.fixture("stat.0")))
        // cpu  1888149 0 159126 884484 8836 0 3775 22020 0 0
        #expect(times.total == 1_888_149 + 159126 + 884484 + 8836 + 3775 + 22020)
        #expect(times.idle == 884484 + 8836)
        let later = try #require(ProcFiles.cpuTimes(stat: Self.fixture("stat.1")))
        #expect(later.total > times.total && later.idle >= times.idle)
    }

    @Test func memoryUsedIsPsutils() throws {
        let memory = try #require(ProcFiles.memory(meminfo: Self.fixture("meminfo")))
        #expect(memory.totalKB == 24_684_092 && memory.freeKB == 20_002_532 && memory.availableKB == 24_055_004)
        #expect(memory.cachedKB == 3_808_836 + 549640 && memory.buffersKB == 53912)
        #expect(memory.usedKB == 24_684_092 - 20_002_532 - (3_808_836 + 549640) - 53912)
    }

    @Test func networkSumsEveryInterface() throws {
        let text = try Self.fixture("net-dev")
        let (received, sent) = try #require(ProcFiles.networkBytes(netDev: text))
        var rx: UInt64 = 0
        var tx: UInt64 = 0
        for line in text.split(separator: "\n").dropFirst(2) {
            let f = line.split(separator: ":")[1].split(separator: " ").compactMap { UInt64($0) }
            rx += f[0]
            tx += f[8]
        }
        #expect(received == rx && sent == tx && received >= 771_180_879)
        #expect(ProcFiles.networkBytes(netDev: "Inter-|\n face |\n") == nil)
    }

    @Test func aProcessesTicksRSSAndThreads() throws {
        let status = try Self.fixture("pid-status")
        let process = try #require(ProcFiles.process(stat: Self.fixture("pid-stat"), status: status))
        #expect(process == ProcFiles.Process(cpuTicks: 651 + 274, rssKB: 159436, threads: 6))
        // A command name with spaces and parentheses does not shift the fields.
        #expect(ProcFiles.process(stat: try Self.fixture("pid-stat-odd-name"), status: status) == process)
        #expect(ProcFiles.process(stat: "12 (x) S 1", status: status) == nil)
    }
}

/// The sampler over recorded `/proc` files: rates between two samples, MLflow's names.
@Suite struct SystemSamplerTests {
    @Test func cpuIsARateBetweenSamplesAndMemoryFollowsPsutil() throws {
        let root = NSTemporaryDirectory() + "armory-proc-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: root + "/proc/net", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: root + "/proc/77", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: root) }
        func put(_ fixture: String, _ path: String) throws {
            try ProcFilesTests.fixture(fixture).write(toFile: root + path, atomically: true, encoding: .utf8)
        }
        try put("stat.0", "/proc/stat")
        try put("meminfo", "/proc/meminfo")
        try put("net-dev", "/proc/net/dev")
        try put("pid-stat", "/proc/77/stat")
        try put("pid-status", "/proc/77/status")
        var sampler = SystemSampler(root: root, diskPath: root, gpus: nil)
        let first = sampler.sampleHost()
        #expect(first.metrics["cpu_utilization_percentage"] == nil)  // no rate from one sample
        #expect(first.metrics["system_memory_usage_percentage"] == SystemSampler.round1(Double(24_684_092 - 20_002_532 - 3_808_836 - 549640 - 53912) / 24_684_092 * 100))
        #expect(first.metrics["disk_usage_percentage"] != nil && first.networkReceived >= 771_180_879)
        try put("stat.1", "/proc/stat")
        let second = sampler.sampleHost()
        let a = try #require(ProcFiles.cpuTimes(stat: ProcFilesTests.fixture("stat.0")))
        let b = try #require(ProcFiles.cpuTimes(stat: ProcFilesTests.fixture("stat.1")))
        let busy = Double((b.total - a.total) - (b.idle - a.idle)) / Double(b.total - a.total) * 100
        #expect(second.metrics["cpu_utilization_percentage"] == SystemSampler.round1(busy))
        // A process: RSS and threads at once, CPU from the second sample on (ticks / tick rate / seconds).
        let sampled = sampler.sampleProcess(77, now: 100)
        let process = try #require(sampled)
        #expect(process["process_memory_rss_megabytes"] == SystemSampler.round1(159436.0 * 1024 / 1e6) && process["process_threads"] == 6)
        #expect(process["process_cpu_utilization_percentage"] == nil)
        let sampledAgain = sampler.sampleProcess(77, now: 110)
        let again = try #require(sampledAgain)
        #expect(again["process_cpu_utilization_percentage"] == 0)
        let gone = sampler.sampleProcess(78, now: 110)
        #expect(gone == nil)
    }
}
