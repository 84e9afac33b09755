import ArmoryDaemon
import ArmoryDaemonTesting
import ArmoryProtocol
import ArmoryTrack
import Foundation
import Logging
import ServiceLifecycle
import Testing

#if canImport(Glibc)
    import Glibc
#endif

@Suite(.serialized) struct EndToEndTests {
    @Test func exampleFlowLandsInTheStore() async throws {
        let daemon = try await TestDaemon()
        let tracker = try Tracker(socketPath: daemon.socketPath, program: "/lab/eval.swift")
        tracker.trackParam("seed", 42)
        let evaluation = tracker.evaluation("e2e", description: "end to end")
        let dataset = evaluation.autotrack { track in
            track.trackable(track.trackCall("load_dataset", ["split": "test", "batch_size": 16]) { "dataset" })
        }
        evaluation.useDataset(dataset)
        for name in ["benign", "attacked"] {
            evaluation.addChain(name) { chain in
                chain.useModel(chain.trackable(chain.trackCall("load_model", ["weights": name]) { name }))
            }
        }
        #expect(try dataset.trackedParams() == ["load_dataset._func": "IntegrationTests.load_dataset", "load_dataset.split": "test", "load_dataset.batch_size": "16"])
        #expect(try evaluation.chains["attacked"]!.trackedParams()["load_model.weights"] == "attacked")
        try evaluation.run { evaluation in
            for (_, chain) in evaluation.chains {
                try chain.run { run in
                    for step in 0..<100 { run.logMetric("loss", Double(step) / 10, step: Int64(step), timestamp: 1_795_400_000_000 + Int64(step)) }
                    run.logMetric("accuracy", .nan, timestamp: 1)
                    try run.logJSON(.object(["value": .double(0.5)]), artifactFile: "metrics/accuracy.txt")
                }
            }
        }
        try tracker.flush(.uploaded)
        let parentID = try #require(evaluation.run?.runID)
        let experimentID = try #require(evaluation.run?.experimentID)
        let runDir = daemon.storeRoot + "/" + experimentID + "/"
        #expect(try String(contentsOfFile: runDir + parentID + "/params/seed", encoding: .utf8) == "42")
        #expect(try String(contentsOfFile: runDir + parentID + "/tags/mlflow.note.content", encoding: .utf8) == "end to end")
        #expect(try String(contentsOfFile: runDir + parentID + "/tags/mlflow.source.name", encoding: .utf8) == "/lab/eval.swift")
        for name in ["benign", "attacked"] {
            let id = try #require(evaluation.chains[name]?.runID)
            let loss = try String(contentsOfFile: runDir + id + "/metrics/loss", encoding: .utf8).split(separator: "\n")
            #expect(loss.count == 100)
            #expect(loss[3] == "1795400000003 0.3 3")
            #expect(try String(contentsOfFile: runDir + id + "/metrics/accuracy", encoding: .utf8) == "1 nan 0\n")
            #expect(try String(contentsOfFile: runDir + id + "/params/load_model.weights", encoding: .utf8) == name)
            #expect(try String(contentsOfFile: runDir + id + "/params/load_dataset.split", encoding: .utf8) == "test")
            #expect(!FileManager.default.fileExists(atPath: runDir + id + "/params/seed"))  // globals: parent only
            #expect(try String(contentsOfFile: runDir + id + "/artifacts/metrics/accuracy.txt", encoding: .utf8) == #"{"value":0.5}"#)
            #expect(try String(contentsOfFile: runDir + id + "/meta.yaml", encoding: .utf8).contains("status: 3"))
        }
        tracker.connection.disconnect()
        try await daemon.stop()
    }

    @Test func attachLaterAndLogMore() async throws {
        let daemon = try await TestDaemon()
        let tracker = try Tracker(socketPath: daemon.socketPath)
        let evaluation = tracker.evaluation("resume")
        evaluation.addChain("only")
        try evaluation.run { try $0.chains["only"]!.run { $0.logMetric("a", 1, timestamp: 1) } }
        let runID = try #require(evaluation.chains["only"]?.runID)
        tracker.connection.disconnect()

        let later = try Tracker(socketPath: daemon.socketPath)
        let run = try later.attach(runID: runID)
        run.logMetric("custom_metric", 42, timestamp: 2)
        try run.logText("hello", artifactFile: "notes/readme.txt")
        try run.end()
        try later.flush(.uploaded)
        let metric = daemon.files(endingWith: runID + "/metrics/custom_metric")
        #expect(metric.count == 1)
        #expect(try String(contentsOfFile: metric[0], encoding: .utf8) == "2 42.0 0\n")
        later.connection.disconnect()
        try await daemon.stop()
    }

    @Test func sixteenConcurrentClientsAreIsolated() async throws {
        let daemon = try await TestDaemon()
        let socket = daemon.socketPath
        try await withThrowingTaskGroup(of: (Int, String, String).self) { group in
            for i in 0..<16 {
                group.addTask {
                    let tracker = try Tracker(socketPath: socket)
                    tracker.trackParam("client", i)
                    try tracker.trackingContext(nested: true) { () throws -> Void in
                        tracker.trackParam("inner", i * 10)
                        #expect(try tracker.currentParams() == ["client": "\(i)", "inner": "\(i * 10)"])
                    }
                    #expect(try tracker.currentParams() == ["client": "\(i)"])
                    let evaluation = tracker.evaluation("isolation")
                    evaluation.addChain("chain-\(i)") { chain in
                        chain.trackCall("f", ["x": i]) {}
                    }
                    try evaluation.run { evaluation in
                        try evaluation.chains["chain-\(i)"]!.run { run in
                            for step in 0..<500 { run.logMetric("m", Double(i), step: Int64(step), timestamp: Int64(step)) }
                        }
                    }
                    try tracker.flush(.uploaded)
                    tracker.connection.disconnect()
                    return (i, evaluation.run!.runID!, evaluation.chains["chain-\(i)"]!.runID!)
                }
            }
            var seenParents = Set<String>()
            for try await (i, parent, chain) in group {
                seenParents.insert(parent)
                #expect(daemon.files(endingWith: parent + "/params/client").map { try! String(contentsOfFile: $0, encoding: .utf8) } == ["\(i)"])
                let chainDir = try #require(daemon.files(endingWith: chain + "/meta.yaml").first).replacingOccurrences(of: "/meta.yaml", with: "")
                #expect(try String(contentsOfFile: chainDir + "/params/f.x", encoding: .utf8) == "\(i)")
                let lines = try String(contentsOfFile: chainDir + "/metrics/m", encoding: .utf8).split(separator: "\n")
                #expect(lines.count == 500)
                #expect(lines.allSatisfy { $0.split(separator: " ")[1] == "\(Double(i))" })
            }
            #expect(seenParents.count == 16)
        }
        // One experiment for all 16 (get-or-create by name).
        #expect(daemon.files(endingWith: "/meta.yaml").filter { !$0.contains("/0/") }.count == 16 * 2 + 1)
        try await daemon.stop()
    }

    @Test func badInputGetsClearErrorsAndTheDaemonServesOn() async throws {
        let daemon = try await TestDaemon()
        let good = try Tracker(socketPath: daemon.socketPath)
        let evaluation = good.evaluation("steady")
        let run = try evaluation.start()

        // Invalid JSON, unknown op, invalid key, unknown handle: errors, and the connection lives on.
        let raw = try RawClient(path: daemon.socketPath)
        try raw.hello()
        raw.write(Frame.encode(Array(#"{"op":"status","seq":2"#.utf8)))
        #expect(try raw.nextError()?.code == .badJSON)
        raw.send(#"{"op":"teleport","seq":3}"#)
        let unknown = try #require(try raw.nextError())
        #expect(unknown.code == .unknownOp && unknown.seq == 3)
        raw.send(#"{"op":"param","seq":4,"key":"bad key!","value":"x"}"#)
        let badKey = try #require(try raw.nextError())
        #expect(badKey.code == .invalidKey && badKey.message.contains("bad key!") && badKey.seq == 4)
        raw.send(#"{"op":"log","seq":5,"run":"no-such-handle","metrics":[["a",1]]}"#)
        #expect(try raw.nextError()?.code == .unknownHandle)
        raw.send(#"{"op":"log","seq":6,"run":"\#(run.handle)","metrics":[["a",1]]}"#)
        #expect(try raw.nextError()?.code == .permissionDenied || getuid() == 0)
        raw.send(#"{"op":"status","seq":7}"#)
        #expect(try raw.next { if case .reply(7, _) = $0 { true } else { false } } != nil)

        // Oversize frame: an error, then the connection is closed.
        let big = try RawClient(path: daemon.socketPath)
        big.write([0x7F, 0xFF, 0xFF, 0xFF, 0x7B])
        #expect(try big.nextError()?.code == .frameTooLarge)
        #expect(try big.next() == nil)

        // Truncated frame, then the client goes away.
        do {
            let truncated = try RawClient(path: daemon.socketPath)
            truncated.write([0, 0, 0, 100, 0x7B, 0x22])
        }

        // Garbage before hello and a frame that is not an object.
        let garbage = try RawClient(path: daemon.socketPath)
        garbage.send(#"{"op":"status","seq":1}"#)
        #expect(try garbage.nextError()?.code == .helloRequired)
        garbage.send("[1,2,3]")
        #expect(try garbage.nextError()?.code == .badFrame)

        // Unsupported protocol: an error, then closed.
        let future = try RawClient(path: daemon.socketPath)
        future.send(#"{"op":"hello","seq":1,"protocol":99}"#)
        #expect(try future.nextError()?.code == .unsupportedProtocol)
        #expect(try future.next() == nil)

        // The well-behaved client was served throughout.
        run.logMetric("still", 1, timestamp: 1)
        try good.flush(.uploaded)
        #expect(daemon.files(endingWith: run.runID! + "/metrics/still").count == 1)
        #expect(try good.status()["state"] == .string("running"))
        good.connection.disconnect()
        try await daemon.stop()
    }

    @Test func deferredErrorsAreRaisedAtTheNextSyncPoint() async throws {
        let daemon = try await TestDaemon()
        let tracker = try Tracker(socketPath: daemon.socketPath)
        let run = try tracker.evaluation("errors").start()
        run.logParam("lr", 0.1)
        run.logParam("lr", 0.2)
        run.logMetric("bad//name", 1)
        let raised = Result { () throws(ArmoryError) in try tracker.flush() }
        guard case .failure(let error) = raised, case .deferred(let errors) = error else {
            Issue.record("no deferred errors raised: \(raised)")
            return
        }
        // The bad key is refused by the client before sending, the changed param by the daemon.
        #expect(Set(errors.map(\.code)) == [.paramChanged, .invalidKey])
        let changed = errors.first { $0.code == .paramChanged }
        #expect(changed?.op == "log" && changed?.key == "lr" && changed?.message.contains("'lr'") == true)
        let badKey = errors.first { $0.code == .invalidKey }
        #expect(badKey?.key == "bad//name" && badKey?.seq == nil)
        try tracker.flush()  // raised once, then cleared
        tracker.connection.disconnect()
        try await daemon.stop()
    }

    @Test func noDaemonNamesThePathAndHowToStartOne() {
        do {
            _ = try Tracker(socketPath: "/tmp/armory-no-such-dir/d.sock")
            Issue.record("connected to nothing")
        } catch {
            #expect(error.description.contains("/tmp/armory-no-such-dir/d.sock"))
            #expect(error.description.contains("armoryd &"))
            #expect(error.description.contains("systemctl --user start armoryd.socket"))
        }
    }

    @Test func socketIsPrivateAndASecondDaemonRefusesToStart() async throws {
        let daemon = try await TestDaemon()
        var info = stat()
        #expect(stat(daemon.socketPath, &info) == 0)
        #expect(info.st_mode & 0o777 == 0o600)
        do {
            let config = DaemonConfiguration(socketPath: daemon.socketPath, storeRoot: daemon.directory + "/m2", stateDirectory: daemon.directory + "/s2")
            try await Daemon(configuration: config, logger: .init(label: "second")).run()
            Issue.record("second daemon started")
        } catch let error as DaemonStartError {
            #expect(error.description.contains("already serving"))
        }
        try await daemon.stop()
    }

    @Test func staleSocketFileIsReplaced() async throws {
        let directory = "/tmp/armoryd-stale-" + String(UUID().uuidString.prefix(8))
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let path = directory + "/d.sock"
        // A socket file nobody listens on (a daemon that died).
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: Array(path.utf8))
            raw[path.utf8.count] = 0
        }
        _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        close(fd)
        #expect(FileManager.default.fileExists(atPath: path))
        var config = DaemonConfiguration(socketPath: path, storeRoot: directory + "/mlruns", stateDirectory: directory + "/state")
        config.eventLoopThreads = 1
        let daemon = Daemon(configuration: config, logger: .init(label: "stale"))
        let group = ServiceGroupHolder(daemon)
        try await Task.sleep(for: .milliseconds(300))
        let tracker = try Tracker(socketPath: path)
        var reply = try tracker.status()
        (reply["op"], reply["seq"]) = (nil, nil)
        // The reply reads back as the type armoryctl uses, and writes out as the daemon sent it.
        let status = try #require(StatusReply(json: reply))
        #expect(status.socket == path && status.state == "running" && status.destinations.count == 1)
        #expect(status.destinations.first?.live?.journalSegments ?? 0 > 0)
        #expect(status.json == reply)
        tracker.connection.disconnect()
        try await group.stop()
        #expect(!FileManager.default.fileExists(atPath: path))  // removed on shutdown
        try? FileManager.default.removeItem(atPath: directory)
    }

    @Test func runsOfAVanishedClientEndFailedAfterTheGracePeriod() async throws {
        let daemon = try await TestDaemon(orphanGrace: 0.3)
        let tracker = try Tracker(socketPath: daemon.socketPath)
        let evaluation = tracker.evaluation("vanish")
        evaluation.addChain("c")
        let chainRun = try evaluation.chains["c"]!.start()
        chainRun.logMetric("sent", 1, timestamp: 1)
        try tracker.flush()
        tracker.connection.disconnect()
        try await Task.sleep(for: .milliseconds(1500))
        let chainRunID = try #require(chainRun.runID)
        let meta = try #require(daemon.files(endingWith: chainRunID + "/meta.yaml").first)
        #expect(try String(contentsOfFile: meta, encoding: .utf8).contains("status: 4"))
        #expect(daemon.files(endingWith: chainRunID + "/metrics/sent").count == 1)
        try await daemon.stop()
    }
}

/// Runs a prepared `Daemon` in a service group until `stop()`.
final class ServiceGroupHolder: Sendable {
    private let group: ServiceGroup
    private let task: Task<Void, Error>

    init(_ daemon: Daemon) {
        let group = ServiceGroup(services: [daemon], gracefulShutdownSignals: [], cancellationSignals: [], logger: Logger(label: "holder"))
        self.group = group
        task = Task { try await group.run() }
    }

    func stop() async throws {
        await group.triggerGracefulShutdown()
        try await task.value
    }
}
