import ArmoryProtocol
import Foundation
import Testing

@testable import MLflow

@Suite struct FileStoreTests {
    let root = "/tmp/armory-filestore-" + UUID().uuidString

    func read(_ path: String) -> String? { try? String(contentsOfFile: root + "/" + path, encoding: .utf8) }

    @Test func newStoreHasTheDefaultExperimentAndTrash() throws {
        _ = try FileStore(root: root)
        let meta = try #require(read("0/meta.yaml"))
        #expect(meta.contains("experiment_id: '0'\n"))
        #expect(meta.contains("name: Default\n"))
        #expect(meta.contains("artifact_location: file://\(root)/0\n"))
        #expect(FileManager.default.fileExists(atPath: root + "/.trash"))
    }

    @Test func experimentsAreGetOrCreateByName() throws {
        let store = try FileStore(root: root)
        let id = try store.experimentID(named: "armory-example")
        #expect(id.count == 18 && id.first != "0" && id.allSatisfy(\.isNumber))
        #expect(try store.experimentID(named: "armory-example") == id)
        // A second store object (a restarted daemon) finds it on disk.
        #expect(try FileStore(root: root).experimentID(named: "armory-example") == id)
        #expect(try #require(read(id + "/meta.yaml")).contains("experiment_id: '\(id)'\nlast_update_time:"))
    }

    @Test func deletedExperimentIsAClearError() throws {
        let store = try FileStore(root: root)
        let id = try store.experimentID(named: "gone")
        try FileManager.default.moveItem(atPath: root + "/" + id, toPath: root + "/.trash/" + id)
        do {
            _ = try FileStore(root: root).experimentID(named: "gone")
            Issue.record("deleted experiment reused")
        } catch {
            #expect(error.description.contains("mlflow experiments restore"))
        }
    }

    @Test func runLayoutMatchesMLflow() throws {
        let store = try FileStore(root: root)
        let exp = try store.experimentID(named: "e")
        let run = FileStoreRun(runID: "0123456789abcdef0123456789abcdef", experimentID: exp, name: "benign", userID: "alice", status: .running, startTime: 1000)
        try store.createRun(run, tags: ["mlflow.runName": "benign", "mlflow.parentRunId": "p"])
        let base = exp + "/" + run.runID
        for dir in ["artifacts", "metrics", "params", "tags"] {
            var isDir: ObjCBool = false
            #expect(FileManager.default.fileExists(atPath: root + "/" + base + "/" + dir, isDirectory: &isDir) && isDir.boolValue)
        }
        #expect(
            read(base + "/meta.yaml") == """
                artifact_uri: file://\(root)/\(base)/artifacts
                end_time: null
                entry_point_name: ''
                experiment_id: '\(exp)'
                lifecycle_stage: active
                run_id: \(run.runID)
                run_name: benign
                source_name: ''
                source_type: 4
                source_version: ''
                start_time: 1000
                status: 1
                tags: []
                user_id: alice

                """)
        #expect(read(base + "/tags/mlflow.parentRunId") == "p")
        try store.logBatch(
            runID: run.runID, experimentID: exp,
            LogBatch(
                metrics: [
                    MetricPoint(key: "loss", value: 1, step: 0, timestamp: 5), MetricPoint(key: "system/cpu", value: .infinity, step: 2, timestamp: 6),
                    MetricPoint(key: "loss", value: 0.5, step: 1, timestamp: 7),
                ],
                params: ["scale/max": "2"], tags: ["t": "v"]))
        #expect(read(base + "/metrics/loss") == "5 1.0 0\n7 0.5 1\n")
        #expect(read(base + "/metrics/system/cpu") == "6 inf 2\n")
        #expect(read(base + "/params/scale/max") == "2")
        try store.updateRun(runID: run.runID, experimentID: exp, status: .finished, endTime: 2000)
        let meta = try #require(read(base + "/meta.yaml"))
        #expect(meta.contains("end_time: 2000\n") && meta.contains("status: 3\n"))
        #expect(store.findRun(runID: run.runID)?.status == .finished)
        #expect(try FileStore(root: root).findRun(runID: run.runID)?.name == "benign")
    }

    @Test func paramsAreImmutableTagsOverwrite() throws {
        let store = try FileStore(root: root)
        let exp = try store.experimentID(named: "e")
        let run = FileStoreRun(runID: "aaaabbbbccccddddeeeeffff00001111", experimentID: exp, name: "r", userID: "u", status: .running, startTime: 1)
        try store.createRun(run, tags: [:])
        try store.logBatch(runID: run.runID, experimentID: exp, LogBatch(params: ["p": "1"], tags: ["t": "a"]))
        try store.logBatch(runID: run.runID, experimentID: exp, LogBatch(params: ["p": "1"], tags: ["t": "b"]))  // same value: fine
        #expect(throws: FileStoreError.self) { try store.logBatch(runID: run.runID, experimentID: exp, LogBatch(params: ["p": "2"])) }
        #expect(read(exp + "/" + run.runID + "/tags/t") == "b")
    }

    @Test func deletedTagsAndExperimentTagsAreWhereMLflowKeepsThem() throws {
        let store = try FileStore(root: root)
        let exp = try store.experimentID(named: "e")
        let run = FileStoreRun(runID: "aaaabbbbccccddddeeeeffff00002222", experimentID: exp, name: "r", userID: "u", status: .running, startTime: 1)
        try store.createRun(run, tags: ["t": "a"])
        try store.deleteTag(runID: run.runID, experimentID: exp, key: "t")
        #expect(read(exp + "/" + run.runID + "/tags/t") == nil)
        #expect(throws: FileStoreError.tagNotFound(key: "t", runID: run.runID)) { try store.deleteTag(runID: run.runID, experimentID: exp, key: "t") }
        store.replay(runIDs: [run.runID])  // a replayed delete may find the tag already gone
        try store.deleteTag(runID: run.runID, experimentID: exp, key: "t")
        try store.setExperimentTag(experimentID: exp, key: "owner", value: "lab")
        #expect(read(exp + "/tags/owner") == "lab")
        #expect(throws: FileStoreError.experimentNotFound("404")) { try store.setExperimentTag(experimentID: "404", key: "k", value: "v") }
    }

    @Test(arguments: ["plain-name", "with space", "yes", "123", "1e5", "0123abcdef", "a: b", "it's", "#hash", "tab\there", "new\nline", "ünïcode", "-dash", "null", ""])
    func yamlScalarsReadBackAsTheSameString(_ value: String) throws {
        let quoted = YAMLScalar.quoted(value)
        // Our own reader (the same rules PyYAML applies to these forms; the Python suite checks PyYAML itself).
        if quoted.hasPrefix("'") {
            #expect(String(quoted.dropFirst().dropLast()).replacingOccurrences(of: "''", with: "'") == value)
        } else if quoted.hasPrefix("\"") {
            #expect(try JSONParser.parse(Array(quoted.utf8)) == .string(value))
        } else {
            #expect(quoted == value)
            #expect(!["yes", "null", "123", "1e5"].contains(value))
        }
    }

    @Test func artifactsMoveIntoTheRunAndPathsAreChecked() throws {
        let store = try FileStore(root: root)
        let exp = try store.experimentID(named: "e")
        let run = FileStoreRun(runID: "99990000aaaabbbbccccddddeeeeffff", experimentID: exp, name: "r", userID: "u", status: .running, startTime: 1)
        try store.createRun(run, tags: [:])
        let spool = root + "/spool-file"
        #expect(FileManager.default.createFile(atPath: spool, contents: Data([1, 2, 3])))
        try store.storeArtifact(runID: run.runID, experimentID: exp, path: "exports/00000/00/input.png", from: spool)
        #expect(FileManager.default.contents(atPath: root + "/" + exp + "/" + run.runID + "/artifacts/exports/00000/00/input.png") == Data([1, 2, 3]))
        #expect(!FileManager.default.fileExists(atPath: spool))
        #expect(throws: FileStoreError.self) { try store.storeArtifact(runID: run.runID, experimentID: exp, path: "../x", from: spool) }
    }
}
