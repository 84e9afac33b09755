@testable import ArmoryDaemon
import Foundation
import Testing

/// The sampler's parsers against `/proc` files recorded on this machine (Fixtures/proc).
@Suite struct ProcFilesTests {
    static func fixture(_ name: String) throws -> String {
        try String(contentsOfFile: URL(fileURLWithPath: #filePath).deletingLastPathComponent().path + "/Fixtures/proc/" + name, encoding: .utf8)
    }

    @Test func cpuTimesAreTheFirstLinesCountersWithIowaitAsIdle() throws {
        let times = try #require(ProcFiles.cpuTimes(stat: Self.fixture("stat.0")))
        // cpu  1888149 0 159126 884484 8836 0 3775 22020 0 0
        #expect(times.total == 1888149 + 159126 + 884484 + 8836 + 3775 + 22020)
        #expect(times.idle == 884484 + 8836)
        let later = try #require(ProcFiles.cpuTimes(stat: Self.fixture("stat.1")))
        #expect(later.total > times.total && later.idle >= times.idle)
    }

    @Test func memoryUsedIsPsutils() throws {
        let memory = try #require(ProcFiles.memory(meminfo: Self.fixture("meminfo")))
        #expect(memory.totalKB == 24684092 && memory.freeKB == 20002532 && memory.availableKB == 24055004)
        #expect(memory.cachedKB == 3808836 + 549640 && memory.buffersKB == 53912)
        #expect(memory.usedKB == 24684092 - 20002532 - (3808836 + 549640) - 53912)
    }

    @Test func networkSumsEveryInterface() throws {
        let text = try Self.fixture("net-dev")
        let (received, sent) = try #require(ProcFiles.networkBytes(netDev: text))
        var rx: UInt64 = 0, tx: UInt64 = 0
        for line in text.split(separator: "\n").dropFirst(2) {
            let f = line.split(separator: ":")[1].split(separator: " ").compactMap { UInt64($0) }
            rx += f[0]
            tx += f[8]
        }
        #expect(received == rx && sent == tx && received >= 771180879)
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
