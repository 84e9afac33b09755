import ArmoryDaemon
import ArmoryDaemonTesting
import ArmoryProtocol
import ArmoryTrack
import Foundation
import Testing

/// `ArmoryTrack` across a daemon restart: the evaluation goes on, its session is resumed, and
/// nothing it logged is lost or doubled.
@Suite(.serialized) struct ResumeTests {
    @Test func anEvaluationOutlivesADaemonRestart() async throws {
        var daemon = try await TestDaemon()
        let tracker = try Tracker(socketPath: daemon.socketPath, program: "/lab/resume.swift")
        let evaluation = tracker.evaluation("resume-swift")
        let chain = evaluation.addChain("c") { _ in }
        try evaluation.start()
        let run = try chain.start()
        for step in 0..<500 { run.logMetric("loss", Double(step), step: Int64(step), timestamp: 1_795_400_000_000 + Int64(step)) }
        try tracker.flush(.durable)
        try await daemon.stop(keepState: true)
        // The daemon is away: calls that do not wait return at once.
        for step in 500..<1000 { run.logMetric("loss", Double(step), step: Int64(step), timestamp: 1_795_400_000_000 + Int64(step)) }
        daemon = try await TestDaemon(directory: daemon.directory)
        try run.logText(String(repeating: "x", count: 3 << 20), artifactFile: "big.txt")
        try chain.end()
        try evaluation.end()
        try tracker.flush(.uploaded)
        #expect(tracker.connection.resumes == 1)
        let experimentID = try #require(run.experimentID)
        let runDir = daemon.storeRoot + "/" + experimentID + "/" + (try #require(run.runID))
        let lines = try String(contentsOfFile: runDir + "/metrics/loss", encoding: .utf8).split(separator: "\n")
        #expect(lines.count == 1000)
        #expect(Set(lines.map { $0.split(separator: " ")[2] }).count == 1000)
        #expect(try String(contentsOfFile: runDir + "/meta.yaml", encoding: .utf8).contains("status: 3"))
        #expect((try FileManager.default.attributesOfItem(atPath: runDir + "/artifacts/big.txt")[.size] as? Int) == 3 << 20)
        tracker.connection.disconnect()
        try await daemon.stop()
    }
}
