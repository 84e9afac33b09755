import Testing

@testable import ArmoryProtocol

/// The admin replies both sides of the socket read as types: what the daemon writes reads back
/// the same, through the wire's JSON text.
struct AdminReplyTests {
    func throughTheWire(_ object: JSONObject) throws -> JSONObject {
        var writer = JSONWriter(capacity: 256)
        writer.write(.object(object))
        return try #require(try JSONParser.parse(writer.bytes).objectValue)
    }

    @Test func aSyncJobReadsBackAsWritten() throws {
        let job = SyncJobStatus(
            id: 3, state: "failed", from: "/var/lib/armory/mlruns", to: "http://mlflow.lab:5000", dryRun: false, runsTotal: 4, runsDone: 4,
            runsCreated: 3, runsUpToDate: 1, metricsTotal: 1200, metricsQueued: 1200, metricsLanded: 1100, artifactBytesTotal: 4096,
            artifactBytesQueued: 4096, artifactBytesLanded: 4096, pendingRecords: 0, conflicts: ["run a: param 'seed' is '7' at the destination"],
            failures: ["run b: rejected"], error: "1 of 4 runs not copied whole", runs: [.object(["source_run": .string("a")])])
        let reply = try throughTheWire(["jobs": .array([.object(job.json)])])
        #expect(SyncJobStatus.jobs(in: reply) == [job])
        #expect(SyncJobStatus.jobs(in: try throughTheWire(["job": .object(job.json)])) == [job])
        #expect(job.isFinished && !SyncJobStatus(id: 1, state: "copying", from: "", to: "").isFinished)
        var running = job
        running.error = nil
        #expect(try throughTheWire(running.json)["error"] == .null)  // the schema's string or null
        #expect(SyncJobStatus(json: ["state": .string("complete")]) == nil)  // no id: not a job
    }
}
