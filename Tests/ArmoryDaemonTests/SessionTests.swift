@testable import ArmoryDaemon
import ArmoryProtocol
import Foundation
import Synchronization
import Testing

/// Drives `Session` directly (no socket) against a real file store in a temporary directory.
final class SessionHarness {
    let directory: String
    let services: DaemonServices
    private var seqs: [UInt64: UInt64] = [:]

    init() throws {
        directory = NSTemporaryDirectory() + "armory-session-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory + "/spool", withIntermediateDirectories: true)
        let uploader = Uploader(sink: try FileStoreSink(root: directory + "/mlruns"))
        uploader.start()
        services = DaemonServices(uploader: uploader, spoolDirectory: directory + "/spool", socketPath: directory + "/s.sock")
    }

    deinit {
        let uploader = services.uploader
        let directory = directory
        Task { _ = await uploader.shutdown(timeout: 5); try? FileManager.default.removeItem(atPath: directory) }
    }

    func session(uid: UInt32 = 1000, connection: UInt64 = 1) -> Session {
        let session = Session(connectionID: connection, peer: PeerCredentials(uid: uid, gid: uid, pid: 4242), services: services) { _ in }
        _ = send(session, .hello(Hello(client: "test", clientVersion: "1", program: "/t.py")))
        return session
    }

    /// Sends an op as a read burst of its own (as the channel handler does at the end of a burst,
    /// the burst's metric records are then enqueued) and resolves deferred outcomes.
    @discardableResult
    func send(_ session: Session, _ op: ClientOp, seq given: UInt64? = nil) -> Result<JSONObject, ProtocolError>? {
        let seq = given ?? (seqs[session.connectionID] ?? 0) + 1
        seqs[session.connectionID] = max(seqs[session.connectionID] ?? 0, seq)
        let outcome = session.handle(ClientFrame(seq: seq, op: op), nowMs: 1_795_400_000_000)
        session.commit()
        switch outcome {
        case .none: return nil
        case .reply(let body): return .success(body)
        case .error(let error), .close(let error): return .failure(error)
        case .deferred(let body):
            let result = Mutex<Result<JSONObject, ProtocolError>?>(nil)
            body { r in result.withLock { $0 = r } }
            for _ in 0..<500 where result.withLock({ $0 }) == nil { usleep(10_000) }
            return result.withLock { $0 }
        case .awaitUploaded(let waits, _):
            let done = Mutex(0)
            for wait in waits { wait.uploader.whenSettled(upTo: wait.ticket) { done.withLock { $0 += 1 } } }
            for _ in 0..<500 where done.withLock({ $0 }) < waits.count { usleep(10_000) }
            return .success(["complete": .bool(done.withLock { $0 } == waits.count)])
        case .awaitDurable(let waits, _):
            let done = Mutex(0)
            for wait in waits { wait.uploader.whenDurable(wait.lsn, urgent: true) { done.withLock { $0 += 1 } } }
            for _ in 0..<500 where done.withLock({ $0 }) < waits.count { usleep(10_000) }
            return .success(["complete": .bool(done.withLock { $0 } == waits.count)])
        case .awaitRun(let handle, let wait, _):
            let done = Mutex(false)
            wait.uploader.whenSettled(upTo: wait.ticket) { done.withLock { $0 = true } }
            for _ in 0..<500 where !done.withLock({ $0 }) { usleep(10_000) }
            guard let entry = services.registry.entry(handle) else { return .failure(ProtocolError(.unknownHandle, handle)) }
            if let failure = entry.failure { return .failure(failure) }
            return .success(entry.descriptor.json)
        }
    }

    /// The reply to a request (throws its error).
    func reply(_ session: Session, _ op: ClientOp) throws -> JSONObject {
        guard let result = send(session, op) else { throw ProtocolError(.internalError, "no reply to \(op.name)") }
        return try result.get()
    }

    func descriptor(_ session: Session, _ op: ClientOp) throws -> RunDescriptor {
        guard let d = RunDescriptor(json: try reply(session, op)) else { throw ProtocolError(.internalError, "not a run") }
        return d
    }

    /// Waits until the uploader applied everything enqueued so far.
    func drain() {
        let done = Mutex(false)
        services.uploader.whenSettled(upTo: services.uploader.lastTicket) { done.withLock { $0 = true } }
        for _ in 0..<500 where !done.withLock({ $0 }) { usleep(10_000) }
    }
}

@Suite struct SessionTests {
    @Test func opsBeforeHelloAreRefused() throws {
        let h = try SessionHarness()
        let raw = Session(connectionID: 5, peer: PeerCredentials(uid: 1, gid: 1, pid: 1), services: h.services) { _ in }
        guard case .error(let e) = raw.handle(ClientFrame(seq: 1, op: .status), nowMs: 0) else {
            Issue.record("accepted before hello")
            return
        }
        #expect(e.code == .helloRequired)
    }

    @Test func unsupportedProtocolClosesWithAClearError() throws {
        let h = try SessionHarness()
        let raw = Session(connectionID: 5, peer: PeerCredentials(uid: 1, gid: 1, pid: 1), services: h.services) { _ in }
        guard case .close(let e) = raw.handle(ClientFrame(seq: 1, op: .hello(Hello(protocolVersion: 99, client: "x", clientVersion: "", program: ""))), nowMs: 0) else {
            Issue.record("protocol 99 accepted")
            return
        }
        #expect(e.code == .unsupportedProtocol)
        #expect(e.message.contains("99"))
    }

    @Test func chainStartCreatesParentAndNestedRun() throws {
        let h = try SessionHarness()
        let s = h.session()
        h.send(s, .trackParam(key: "global", value: "g"))
        h.send(s, .evaluation(id: 1, name: "eval", description: "about"))
        h.send(s, .pushContext(nested: false, trackables: true))
        h.send(s, .chain(id: 2, evaluation: 1, name: "benign"))
        h.send(s, .trackParams(prefix: "load_model", function: "m.load_model", values: ["name": "r"]))
        h.send(s, .popContext)
        let chain = try h.reply(s, .start(.chain(2)))
        let descriptor = try #require(RunDescriptor(json: chain))
        #expect(descriptor.name == "benign")
        #expect(descriptor.experimentID != nil)
        let parentHandle = try #require(descriptor.parentHandle)
        let parent = try #require(h.services.registry.entry(parentHandle))
        #expect(parent.params == ["global": "g"])
        let entry = try #require(h.services.registry.entry(descriptor.handle))
        #expect(entry.params == ["load_model._func": "m.load_model", "load_model.name": "r"])
        h.drain()
        let runDir = h.directory + "/mlruns/" + descriptor.experimentID! + "/" + descriptor.runID!
        #expect(try String(contentsOfFile: runDir + "/tags/mlflow.parentRunId", encoding: .utf8) == parent.runID)
        #expect(try String(contentsOfFile: runDir + "/params/load_model.name", encoding: .utf8) == "r")
    }

    @Test func getTrackableOfAChainAnswersItsMergedParams() throws {
        let h = try SessionHarness()
        let s = h.session()
        h.send(s, .evaluation(id: 1, name: "eval", description: nil))
        h.send(s, .pushContext(nested: false, trackables: true))
        h.send(s, .trackParam(key: "dataset.split", value: "test"))
        h.send(s, .trackable(id: 5))
        h.send(s, .popContext)
        h.send(s, .use(target: 1, role: .dataset, ids: [5], append: false))
        h.send(s, .pushContext(nested: false, trackables: true))
        h.send(s, .chain(id: 2, evaluation: 1, name: "c"))
        h.send(s, .trackParam(key: "own", value: "1"))
        h.send(s, .popContext)
        let reply = try h.reply(s, .getTrackable(id: 2))
        #expect(reply["params"] == .object(["own": "1", "dataset.split": "test"]))
    }

    @Test func globalsSetAfterTheParentStartedStillGoToItAndAChangeIsRefusedOnce() throws {
        let h = try SessionHarness()
        let s = h.session()
        h.send(s, .evaluation(id: 1, name: "eval", description: nil))
        let parent = try h.descriptor(s, .start(.evaluation(1)))
        h.send(s, .trackParam(key: "late", value: "1"))
        #expect(h.services.registry.entry(parent.handle)?.params["late"] == "1")
        // Changing it afterwards is refused: MLflow params are immutable.
        let changed = h.send(s, .trackParam(key: "late", value: "2"))
        guard case .failure(let e)? = changed else {
            Issue.record("changed global param accepted")
            return
        }
        #expect(e.code == .paramChanged && e.key == "late")
        #expect(e.message.contains("'late'"))
        // Later, unrelated params are recorded without an error naming the refused key again.
        #expect(h.send(s, .trackParam(key: "batch", value: "32")) == nil)
        #expect(h.send(s, .trackParams(prefix: "model", function: "m.f", values: ["depth": "3"])) == nil)
        #expect(h.services.registry.entry(parent.handle)?.params["batch"] == "32")
        #expect(h.services.registry.entry(parent.handle)?.params["late"] == "1")
    }

    @Test func evaluationsChainsAndTrackablesShareOneNamespaceOfIds() throws {
        let h = try SessionHarness()
        let s = h.session()
        h.send(s, .evaluation(id: 1, name: "eval", description: nil))
        h.send(s, .trackable(id: 2))
        for clash: ClientOp in [.chain(id: 1, evaluation: 1, name: "c"), .trackable(id: 1), .evaluation(id: 2, name: "other", description: nil)] {
            guard case .failure(let e)? = h.send(s, clash) else {
                Issue.record("\(clash.name) reusing an id was accepted")
                continue
            }
            #expect(e.code == .invalidValue && e.message.contains("namespace"))
        }
    }

    @Test func loggingToAnEndedChainIsRefusedButMLflowsOwnRunsMayBeLoggedAfterTheirEnd() throws {
        let h = try SessionHarness()
        let s = h.session()
        h.send(s, .evaluation(id: 1, name: "eval", description: nil))
        h.send(s, .pushContext(nested: false, trackables: true))
        h.send(s, .chain(id: 2, evaluation: 1, name: "c"))
        h.send(s, .popContext)
        let chain = try h.descriptor(s, .start(.chain(2)))
        _ = try h.reply(s, .end(.chain(2), status: .finished, endTime: nil))
        guard case .failure(let e)? = h.send(s, .log(run: chain.handle, batch: LogBatch(metrics: [MetricPoint(key: "late", value: 1, timestamp: 5)]))) else {
            Issue.record("logging to an ended chain was accepted")
            return
        }
        #expect(e.code == .invalidState && e.key == "late" && e.op == "log")
        // A run of MLflow's API (create_run) may still be logged to once finished, as MLflow allows.
        let experiment = try h.reply(s, .experiment(name: "mlflow-api", create: true))["experiment_id"]?.stringValue ?? ""
        let run = try h.descriptor(s, .createRun(experimentID: experiment, runName: "r", startTime: nil, tags: [:]))
        _ = try h.reply(s, .end(.run(run.handle), status: .finished, endTime: nil))
        #expect(h.send(s, .log(run: run.handle, batch: LogBatch(metrics: [MetricPoint(key: "late", value: 1, timestamp: 5)]))) == nil)
    }

    @Test func anUnreadableFrameIsAnsweredWithTheSeqReadFromItElseTheNextOne() throws {
        let h = try SessionHarness()
        let s = h.session()
        h.send(s, .trackParam(key: "a", value: "1"), seq: 2)
        let named = s.refuseUnreadable(ProtocolError(.badJSON, "broken", seq: 3, op: "param"))
        #expect(named?.seq == 3 && named?.op == "param")
        let unnamed = s.refuseUnreadable(ProtocolError(.frameTooLarge, "too large"))
        #expect(unnamed?.seq == 4)
        #expect(s.handledSeq == 4)  // answered: acked with the frames around it
        // A resent copy of a fire-and-forget frame already answered is dropped; a request's is answered again.
        #expect(s.refuseUnreadable(ProtocolError(.badJSON, "again", seq: 3, op: "param")) == nil)
        #expect(s.refuseUnreadable(ProtocolError(.badJSON, "again", seq: 3, op: "start"))?.seq == 3)
    }

    @Test func loggingAChangedParamIsRefusedAndTheRestLands() throws {
        let h = try SessionHarness()
        let s = h.session()
        h.send(s, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(s, .start(.evaluation(1)))
        h.send(s, .log(run: run.handle, batch: LogBatch(params: ["lr": "0.1"])))
        let result = h.send(s, .log(run: run.handle, batch: LogBatch(metrics: [MetricPoint(key: "loss", value: 1, timestamp: 5)], params: ["lr": "0.2", "new": "x"])))
        guard case .failure(let e)? = result else {
            Issue.record("changed param accepted")
            return
        }
        #expect(e.code == .paramChanged && e.message.contains("'lr'"))
        #expect(e.op == "log")
        h.drain()
        let dir = h.directory + "/mlruns/" + run.experimentID! + "/" + run.runID!
        #expect(try String(contentsOfFile: dir + "/params/lr", encoding: .utf8) == "0.1")
        #expect(try String(contentsOfFile: dir + "/params/new", encoding: .utf8) == "x")
        #expect(try String(contentsOfFile: dir + "/metrics/loss", encoding: .utf8) == "5 1.0 0\n")
    }

    @Test func aBurstsMetricRecordsReachTheUploaderTogetherBeforeAnyOtherOp() throws {
        let h = try SessionHarness()
        let s = h.session()
        h.send(s, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(s, .start(.evaluation(1)))
        let uploader = h.services.uploader
        let before = uploader.lastTicket
        for seq in 100..<103 {  // three frames of one read burst
            _ = s.handle(ClientFrame(seq: UInt64(seq), op: .log(run: run.handle, batch: LogBatch(metrics: [MetricPoint(key: "m", value: 1, step: Int64(seq), timestamp: 1)]))), nowMs: 1)
        }
        #expect(uploader.lastTicket == before)  // held until the burst ends
        guard case .awaitUploaded(let waits, _) = s.handle(ClientFrame(seq: 103, op: .flush(.uploaded, timeoutMs: 1000)), nowMs: 1) else {
            Issue.record("flush did not wait for the upload")
            return
        }
        #expect(uploader.lastTicket == before + 3)  // the flush saw them first
        #expect(waits.map(\.ticket) == [before + 3])
    }

    @Test func aRunWhoseClientLogsSystemMetricsIsNoLongerSampledByTheDaemon() throws {
        let h = try SessionHarness()
        let s = h.session()
        h.send(s, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(s, .start(.evaluation(1)))
        #expect(h.services.registry.entry(run.handle)?.systemMetrics == true)
        h.send(s, .log(run: run.handle, batch: LogBatch(metrics: [MetricPoint(key: "system/cpu_utilization_percentage", value: 5, step: 0, timestamp: 1)])))
        #expect(h.services.registry.entry(run.handle)?.systemMetrics == false)  // MLflow's own monitor is running
    }

    @Test func invalidKeysAreNamedAndValidEntriesStillLand() throws {
        let h = try SessionHarness()
        let s = h.session()
        h.send(s, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(s, .start(.evaluation(1)))
        let batch = LogBatch(metrics: [MetricPoint(key: "ok", value: 1, timestamp: 1), MetricPoint(key: "bad//key", value: 2, timestamp: 1)])
        guard case .failure(let e)? = h.send(s, .log(run: run.handle, batch: batch)) else {
            Issue.record("invalid key accepted")
            return
        }
        #expect(e.code == .invalidKey && e.message.contains("bad//key"))
        h.drain()
        #expect(FileManager.default.fileExists(atPath: h.directory + "/mlruns/" + run.experimentID! + "/" + run.runID! + "/metrics/ok"))
    }

    @Test func unknownHandleIsAClearError() throws {
        let h = try SessionHarness()
        let s = h.session()
        guard case .failure(let e)? = h.send(s, .log(run: "nope", batch: LogBatch(tags: ["a": "b"]))) else {
            Issue.record("unknown handle accepted")
            return
        }
        #expect(e.code == .unknownHandle && e.message.contains("nope"))
    }

    @Test func anotherUidCannotWriteOrAttach() throws {
        let h = try SessionHarness()
        let owner = h.session(uid: 1000, connection: 1)
        h.send(owner, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(owner, .start(.evaluation(1)))
        let intruder = h.session(uid: 2000, connection: 2)
        guard case .failure(let e)? = h.send(intruder, .log(run: run.handle, batch: LogBatch(tags: ["x": "y"]))) else {
            Issue.record("other uid wrote")
            return
        }
        #expect(e.code == .permissionDenied)
        guard case .failure(let a)? = h.send(intruder, .attach(runID: run.runID!)) else {
            Issue.record("other uid attached")
            return
        }
        #expect(a.code == .permissionDenied)
        // root may.
        let root = h.session(uid: 0, connection: 3)
        #expect(throws: Never.self) { try h.send(root, .attach(runID: run.runID!))?.get() }
    }

    @Test func endingTheEvaluationEndsOpenChainsWithTheSameStatus() throws {
        let h = try SessionHarness()
        let s = h.session()
        h.send(s, .evaluation(id: 1, name: "eval", description: nil))
        h.send(s, .chain(id: 2, evaluation: 1, name: "a"))
        let chain = try h.descriptor(s, .start(.chain(2)))
        _ = try h.send(s, .end(.evaluation(1), status: .killed, endTime: nil))?.get()
        #expect(h.services.registry.entry(chain.handle)?.status == .killed)
        #expect(h.services.registry.entry(chain.parentHandle!)?.status == .killed)
        h.drain()
        let meta = try String(contentsOfFile: h.directory + "/mlruns/" + chain.experimentID! + "/" + chain.runID! + "/meta.yaml", encoding: .utf8)
        #expect(meta.contains("status: 5"))
    }

    @Test func attachReopensAFinishedRunFromTheStore() throws {
        let h = try SessionHarness()
        let first = h.session(uid: 0, connection: 1)
        h.send(first, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(first, .start(.evaluation(1)))
        _ = try h.send(first, .end(.evaluation(1), status: .finished, endTime: nil))?.get()
        h.drain()
        // A fresh registry (as after a restart) finds it in the store.
        let h2 = SessionHarnessView(base: h)
        let second = h2.harness.session(uid: 0, connection: 2)
        let attached = try h2.harness.descriptor(second, .attach(runID: run.runID!))
        #expect(attached.runID == run.runID)
        #expect(attached.status == .running)
    }

    @Test func artifactsAreSpooledThenStored() throws {
        let h = try SessionHarness()
        let s = h.session()
        h.send(s, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(s, .start(.evaluation(1)))
        let opened = try h.reply(s, .artifactOpen(run: run.handle, path: "exports/00000/00/a.bin"))
        let id = try #require(opened["artifact"]?.intValue)
        h.send(s, .artifactChunk(artifact: id, data: [1, 2, 3]))
        h.send(s, .artifactChunk(artifact: id, data: [4]))
        let closed = try h.reply(s, .artifactClose(artifact: id))
        #expect(closed["bytes"] == .int(4))
        h.drain()
        let stored = FileManager.default.contents(atPath: h.directory + "/mlruns/" + run.experimentID! + "/" + run.runID! + "/artifacts/exports/00000/00/a.bin")
        #expect(stored.map(Array.init) == [1, 2, 3, 4])
        #expect(try FileManager.default.contentsOfDirectory(atPath: h.directory + "/spool").isEmpty)
    }

    @Test(arguments: ["../escape", "/abs", "a//b", "", "a/../../b"])
    func artifactPathsMustStayInsideTheRun(_ path: String) throws {
        let h = try SessionHarness()
        let s = h.session()
        h.send(s, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(s, .start(.evaluation(1)))
        guard case .failure(let e)? = h.send(s, .artifactOpen(run: run.handle, path: path)) else {
            Issue.record("path \(path) accepted")
            return
        }
        #expect(e.code == .invalidValue)
    }

    @Test func closedConnectionDetachesItsRunningRuns() throws {
        let h = try SessionHarness()
        let s = h.session()
        h.send(s, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(s, .start(.evaluation(1)))
        #expect(s.connectionClosed() == [run.handle])
        #expect(h.services.registry.entry(run.handle)?.connection == nil)
    }
}

/// A second harness over the same store directory (a daemon restart: empty registry).
struct SessionHarnessView {
    let harness: SessionHarness
    init(base: SessionHarness) {
        harness = try! SessionHarness(sharingStoreOf: base)
    }
}

extension SessionHarness {
    convenience init(sharingStoreOf other: SessionHarness) throws {
        try self.init()
        try? FileManager.default.removeItem(atPath: directory + "/mlruns")
        try FileManager.default.createSymbolicLink(atPath: directory + "/mlruns", withDestinationPath: other.directory + "/mlruns")
    }
}
