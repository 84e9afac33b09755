import ArmoryProtocol
import Foundation
import Testing

@testable import MLflow

@Suite struct FileStoreReaderTests {
    let root = "/tmp/armory-reader-" + UUID().uuidString

    /// A store written by the writer, then moved elsewhere (a store carried off another host).
    func writtenAndMoved() throws -> (FileStoreReader, experiment: String) {
        let store = try FileStore(root: root + "/original")
        let exp = try store.experimentID(named: "carried")
        try store.setExperimentTag(experimentID: exp, key: "team", value: "red")
        let parent = FileStoreRun(runID: "aaaa0000aaaa0000aaaa0000aaaa0000", experimentID: exp, name: "parent", userID: "alice", status: .running, startTime: 10)
        let child = FileStoreRun(runID: "bbbb0000bbbb0000bbbb0000bbbb0000", experimentID: exp, name: "benign", userID: "alice", status: .running, startTime: 20)
        try store.createRun(parent, tags: ["mlflow.runName": "parent"])
        try store.createRun(child, tags: ["mlflow.runName": "benign", "mlflow.parentRunId": parent.runID])
        try store.logBatch(
            runID: child.runID, experimentID: exp,
            LogBatch(
                metrics: [
                    MetricPoint(key: "loss", value: 1, step: 0, timestamp: 5), MetricPoint(key: "loss", value: .nan, step: 1, timestamp: 6),
                    MetricPoint(key: "system/cpu", value: -.infinity, step: 0, timestamp: 7), MetricPoint(key: "loss", value: 1e-300, step: 2, timestamp: 8),
                ],
                params: ["scale/max": "2", "seed": "42"], tags: ["note": "it's"]))
        let spool = root + "/spool"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        #expect(FileManager.default.createFile(atPath: spool, contents: Data(repeating: 7, count: 1000)))
        try store.storeArtifact(runID: child.runID, experimentID: exp, path: "exports/00/input.png", from: spool)
        try store.updateRun(runID: child.runID, experimentID: exp, status: .finished, endTime: 30)
        try FileManager.default.moveItem(atPath: root + "/original", toPath: root + "/copied")
        return (try FileStoreReader(root: root + "/copied/"), exp)
    }

    @Test func readsBackWhatTheWriterWroteAfterTheStoreMoved() throws {
        let (reader, exp) = try writtenAndMoved()
        let experiment = try #require(reader.experiments().first { $0.name == "carried" })
        #expect(experiment.id == exp && !experiment.isDeleted && experiment.tags == ["team": "red"])
        #expect(reader.experiments().contains { $0.id == "0" && $0.name == "Default" })
        let runs = reader.runs(of: experiment)
        #expect(runs.map(\.info.name) == ["parent", "benign"])
        let child = runs[1]
        #expect(child.info.status == .finished && child.info.endTime == 30 && child.info.startTime == 20 && child.info.userID == "alice")
        #expect(runs[0].info.endTime == nil)
        #expect(reader.params(of: child) == ["scale/max": "2", "seed": "42"])
        #expect(reader.tags(of: child)["mlflow.parentRunId"] == runs[0].info.runID && reader.tags(of: child)["note"] == "it's")
        #expect(reader.metricKeys(of: child) == ["loss", "system/cpu"])
        let loss = reader.metricPoints(of: child, key: "loss")
        #expect(loss.map(\.step) == [0, 1, 2] && loss.map(\.timestamp) == [5, 6, 8])
        #expect(loss[0].value == 1 && loss[1].value.isNaN && loss[2].value == 1e-300)
        #expect(reader.metricPoints(of: child, key: "system/cpu").first?.value == -.infinity)
        #expect(reader.metricPoints(of: child, key: "loss", from: 2).map(\.step) == [2])
        let artifacts = reader.artifacts(of: child)
        #expect(artifacts.map(\.path) == ["exports/00/input.png"] && artifacts.map(\.bytes) == [1000])
        // Found under the moved run's directory, not through the recorded (old) artifact URI.
        #expect(FileManager.default.contents(atPath: reader.artifactFile(of: child, path: "exports/00/input.png"))?.count == 1000)
    }

    @Test func aTornLastMetricLineIsSkipped() throws {
        let (reader, _) = try writtenAndMoved()
        let child = try #require(reader.experiments().flatMap { reader.runs(of: $0) }.first { $0.info.name == "benign" })
        let handle = try #require(FileHandle(forWritingAtPath: child.directory + "/metrics/loss"))
        handle.seekToEndOfFile()
        handle.write(Data("9 0.2".utf8))
        try handle.close()
        #expect(reader.metricPoints(of: child, key: "loss").count == 3)
        #expect(reader.metricCount(of: child, key: "loss") == 3)  // counted the way points are read
    }

    @Test func aLongHistoryStreamsInChunksFromAnyLine() throws {
        let (reader, _) = try writtenAndMoved()
        let child = try #require(reader.experiments().flatMap { reader.runs(of: $0) }.first { $0.info.name == "benign" })
        let lines = (0..<2500).map { "\(1000 + $0) \(Double($0) / 4) \($0)\n" }.joined()
        try Data(lines.utf8).write(to: URL(fileURLWithPath: child.directory + "/metrics/long"))
        #expect(reader.metricCount(of: child, key: "long") == 2500)
        let stream = try #require(reader.metricStream(of: child, key: "long", from: 700))
        var chunks: [[MetricPoint]] = []
        while let chunk = stream.next(upTo: 1000) { chunks.append(chunk) }
        #expect(chunks.map(\.count) == [1000, 800])
        #expect(chunks.joined().map(\.step) == Array(700..<2500) && chunks[1].last?.value == 2499.0 / 4 && chunks[0].first?.timestamp == 1700)
        #expect(reader.metricStream(of: child, key: "absent", from: 0) == nil)
    }

    @Test func aDirectoryThatIsNotAStoreIsAClearError() throws {
        try FileManager.default.createDirectory(atPath: root + "/empty", withIntermediateDirectories: true)
        #expect { try FileStoreReader(root: root + "/empty") } throws: { "\($0)".contains("not an MLflow file store") }
        #expect { try FileStoreReader(root: root + "/missing") } throws: { "\($0)".contains("does not exist") }
    }
}
