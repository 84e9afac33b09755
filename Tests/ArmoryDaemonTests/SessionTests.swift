import ArmoryDaemonTesting
import ArmoryProtocol
import Testing

@testable import ArmoryDaemon

@Suite struct SessionTests {
    private static func machine(_ registry: RunRegistry) -> SessionStateMachine {
        SessionStateMachine(number: 9, peer: PeerCredentials(uid: 1, gid: 1, pid: 1), runs: registry, userName: "u", spoolDirectory: "/spool")
    }

    @Test func opsBeforeHelloAreRefused() {
        var raw = Self.machine(RunRegistry())
        guard case .error(let e) = raw.receive(ClientFrame(seq: 1, op: .status), nowMs: 0) else {
            Issue.record("accepted before hello")
            return
        }
        #expect(e.code == .helloRequired && e.seq == 1)
    }

    @Test func unsupportedProtocolClosesWithAClearError() {
        var raw = Self.machine(RunRegistry())
        guard case .close(let e) = raw.receive(ClientFrame(seq: 1, op: .hello(Hello(protocolVersion: 99, client: "x", clientVersion: "", program: ""))), nowMs: 0) else {
            Issue.record("protocol 99 accepted")
            return
        }
        #expect(e.code == .unsupportedProtocol)
        #expect(e.message.contains("99"))
    }

    @Test func chainStartCreatesParentAndNestedRun() throws {
        var h = SessionHarness()
        var s = h.session()
        h.send(&s, .trackParam(key: "global", value: "g"))
        h.send(&s, .evaluation(id: 1, name: "eval", description: "about"))
        h.send(&s, .pushContext(nested: false, trackables: true))
        h.send(&s, .chain(id: 2, evaluation: 1, name: "benign"))
        h.send(&s, .trackParams(prefix: "load_model", function: "m.load_model", values: ["name": "r"]))
        h.send(&s, .popContext)
        let descriptor = try h.descriptor(&s, .start(.chain(2)))
        #expect(descriptor.name == "benign")
        let parentHandle = try #require(descriptor.parentHandle)
        #expect(h.registry.entry(parentHandle)?.params == ["global": "g"])
        #expect(h.registry.entry(descriptor.handle)?.params == ["load_model._func": "m.load_model", "load_model.name": "r"])
        // The parent's creation, its params, then the chain's creation under it and its params.
        guard case .createRun(let parent) = h.records(of: parentHandle).first, case .createRun(let chain) = h.records(of: descriptor.handle).first else {
            Issue.record("no creations: \(h.records)")
            return
        }
        #expect(parent.name == "eval" && parent.tags["mlflow.note.content"] == "about" && parent.tags["mlflow.user"] == "user1000")
        #expect(chain.parentHandle == parentHandle && chain.tags["mlflow.runName"] == "benign")
        #expect(h.batches(of: parentHandle).map(\.params) == [["global": "g"]])
        #expect(h.batches(of: descriptor.handle).map(\.params) == [["load_model._func": "m.load_model", "load_model.name": "r"]])
        #expect(h.records.map(\.handle) == [parentHandle, parentHandle, descriptor.handle, descriptor.handle])
    }

    @Test func getTrackableOfAChainAnswersItsMergedParams() throws {
        var h = SessionHarness()
        var s = h.session()
        h.send(&s, .evaluation(id: 1, name: "eval", description: nil))
        h.send(&s, .pushContext(nested: false, trackables: true))
        h.send(&s, .trackParam(key: "dataset.split", value: "test"))
        h.send(&s, .trackable(id: 5))
        h.send(&s, .popContext)
        h.send(&s, .use(target: 1, role: .dataset, ids: [5], append: false))
        h.send(&s, .pushContext(nested: false, trackables: true))
        h.send(&s, .chain(id: 2, evaluation: 1, name: "c"))
        h.send(&s, .trackParam(key: "own", value: "1"))
        h.send(&s, .popContext)
        let reply = try h.reply(&s, .getTrackable(id: 2))
        #expect(reply["params"] == .object(["own": "1", "dataset.split": "test"]))
    }

    @Test func globalsSetAfterTheParentStartedStillGoToItAndAChangeIsRefusedOnce() throws {
        var h = SessionHarness()
        var s = h.session()
        h.send(&s, .evaluation(id: 1, name: "eval", description: nil))
        let parent = try h.descriptor(&s, .start(.evaluation(1)))
        h.send(&s, .trackParam(key: "late", value: "1"))
        #expect(h.registry.entry(parent.handle)?.params["late"] == "1")
        // Changing it afterwards is refused: MLflow params are immutable.
        guard case .failure(let e)? = h.send(&s, .trackParam(key: "late", value: "2")) else {
            Issue.record("changed global param accepted")
            return
        }
        #expect(e.code == .paramChanged && e.key == "late")
        #expect(e.message.contains("'late'"))
        // Later, unrelated params are recorded without an error naming the refused key again.
        #expect(h.send(&s, .trackParam(key: "batch", value: "32")) == nil)
        #expect(h.send(&s, .trackParams(prefix: "model", function: "m.f", values: ["depth": "3"])) == nil)
        #expect(h.registry.entry(parent.handle)?.params["batch"] == "32")
        #expect(h.batches(of: parent.handle).map(\.params) == [["late": "1"], ["batch": "32"], ["model._func": "m.f", "model.depth": "3"]])
    }

    @Test func evaluationsChainsAndTrackablesShareOneNamespaceOfIds() {
        var h = SessionHarness()
        var s = h.session()
        h.send(&s, .evaluation(id: 1, name: "eval", description: nil))
        h.send(&s, .trackable(id: 2))
        for clash: ClientOp in [.chain(id: 1, evaluation: 1, name: "c"), .trackable(id: 1), .evaluation(id: 2, name: "other", description: nil)] {
            guard case .failure(let e)? = h.send(&s, clash) else {
                Issue.record("\(clash.name) reusing an id was accepted")
                continue
            }
            #expect(e.code == .invalidValue && e.message.contains("namespace"))
        }
    }

    @Test func loggingToAnEndedChainIsRefusedButMLflowsOwnRunsMayBeLoggedAfterTheirEnd() throws {
        var h = SessionHarness()
        var s = h.session()
        h.send(&s, .evaluation(id: 1, name: "eval", description: nil))
        h.send(&s, .chain(id: 2, evaluation: 1, name: "c"))
        let chain = try h.descriptor(&s, .start(.chain(2)))
        _ = try h.reply(&s, .end(.chain(2), status: .finished, endTime: nil))
        guard case .failure(let e)? = h.send(&s, .log(run: chain.handle, batch: LogBatch(metrics: [MetricPoint(key: "late", value: 1, timestamp: 5)]))) else {
            Issue.record("logging to an ended chain was accepted")
            return
        }
        #expect(e.code == .invalidState && e.key == "late" && e.op == "log")
        // A run of MLflow's API (create_run) may still be logged to once finished, as MLflow allows.
        let run = try h.descriptor(&s, .createRun(experimentID: "0", runName: "r", startTime: nil, tags: [:]))
        _ = try h.reply(&s, .end(.run(run.handle), status: .finished, endTime: nil))
        #expect(h.send(&s, .log(run: run.handle, batch: LogBatch(metrics: [MetricPoint(key: "late", value: 1, timestamp: 5)]))) == nil)
        #expect(h.batches(of: run.handle).count == 1)
    }

    @Test func anUnreadableFrameIsAnsweredWithTheSeqReadFromItElseTheNextOne() {
        var h = SessionHarness()
        var s = h.session()
        h.send(&s, .trackParam(key: "a", value: "1"), seq: 2)
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
        var h = SessionHarness()
        var s = h.session()
        h.send(&s, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(&s, .start(.evaluation(1)))
        h.send(&s, .log(run: run.handle, batch: LogBatch(params: ["lr": "0.1"])))
        let result = h.send(&s, .log(run: run.handle, batch: LogBatch(metrics: [MetricPoint(key: "loss", value: 1, timestamp: 5)], params: ["lr": "0.2", "new": "x"])))
        guard case .failure(let e)? = result else {
            Issue.record("changed param accepted")
            return
        }
        #expect(e.code == .paramChanged && e.message.contains("'lr'"))
        #expect(e.op == "log")
        #expect(h.batches(of: run.handle).last == LogBatch(metrics: [MetricPoint(key: "loss", value: 1, timestamp: 5)], params: ["new": "x"]))
        #expect(h.registry.entry(run.handle)?.params == ["lr": "0.1", "new": "x"])
    }

    @Test func aBurstsMetricFramesAreCommittedTogetherAndEveryOtherFrameAlone() throws {
        var h = SessionHarness()
        var s = h.session()
        h.send(&s, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(&s, .start(.evaluation(1)))
        var frames: [ClientFrame] = []
        for seq in 100..<103 {  // three frames of one read burst
            frames.append(ClientFrame(seq: UInt64(seq), op: .log(run: run.handle, batch: LogBatch(metrics: [MetricPoint(key: "m", value: 1, step: Int64(seq), timestamp: 1)]))))
            #expect(SessionStateMachine.waitsForBurst(frames.last!))
            #expect(s.receive(frames.last!, nowMs: 1).isNone)
        }
        let tagged = ClientFrame(seq: 103, op: .log(run: run.handle, batch: LogBatch(tags: ["t": "v"])))
        #expect(!SessionStateMachine.waitsForBurst(tagged))
        #expect(!SessionStateMachine.waitsForBurst(ClientFrame(seq: 104, op: .flush(.uploaded, timeoutMs: 1000))))
        let committed = s.commit()
        let commit = try #require(committed)
        #expect(commit.records.map(\.record.metricCount) == [1, 1, 1])
        guard case .sessionMark(let id, let seq)? = commit.tail else {
            Issue.record("the burst's commit carries no mark: \(String(describing: commit.tail))")
            return
        }
        #expect(id == s.id && seq == 102)
        guard case .awaitUploaded(let timeoutMs) = s.receive(ClientFrame(seq: 104, op: .flush(.uploaded, timeoutMs: 1000)), nowMs: 1) else {
            Issue.record("flush did not wait for the upload")
            return
        }
        #expect(timeoutMs == 1000)
    }

    @Test func aRunWhoseClientLogsSystemMetricsIsNoLongerSampledByTheDaemon() throws {
        var h = SessionHarness()
        var s = h.session()
        h.send(&s, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(&s, .start(.evaluation(1)))
        #expect(h.registry.entry(run.handle)?.systemMetrics == true)
        h.send(&s, .log(run: run.handle, batch: LogBatch(metrics: [MetricPoint(key: "system/cpu_utilization_percentage", value: 5, step: 0, timestamp: 1)])))
        #expect(h.registry.entry(run.handle)?.systemMetrics == false)  // MLflow's own monitor is running
    }

    @Test func invalidKeysAreNamedAndValidEntriesStillLand() throws {
        var h = SessionHarness()
        var s = h.session()
        h.send(&s, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(&s, .start(.evaluation(1)))
        let batch = LogBatch(metrics: [MetricPoint(key: "ok", value: 1, timestamp: 1), MetricPoint(key: "bad//key", value: 2, timestamp: 1)])
        guard case .failure(let e)? = h.send(&s, .log(run: run.handle, batch: batch)) else {
            Issue.record("invalid key accepted")
            return
        }
        #expect(e.code == .invalidKey && e.message.contains("bad//key"))
        #expect(h.batches(of: run.handle).last?.metrics.map(\.key) == ["ok"])
    }

    @Test func unknownHandleIsAClearError() {
        var h = SessionHarness()
        var s = h.session()
        guard case .failure(let e)? = h.send(&s, .log(run: "nope", batch: LogBatch(tags: ["a": "b"]))) else {
            Issue.record("unknown handle accepted")
            return
        }
        #expect(e.code == .unknownHandle && e.message.contains("nope"))
    }

    @Test func anotherUidCannotWriteOrAttach() throws {
        var h = SessionHarness()
        var owner = h.session(uid: 1000)
        h.send(&owner, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(&owner, .start(.evaluation(1)))
        var intruder = h.session(uid: 2000)
        guard case .failure(let e)? = h.send(&intruder, .log(run: run.handle, batch: LogBatch(tags: ["x": "y"]))) else {
            Issue.record("other uid wrote")
            return
        }
        #expect(e.code == .permissionDenied)
        guard case .failure(let a)? = h.send(&intruder, .attach(runID: run.runID!)) else {
            Issue.record("other uid attached")
            return
        }
        #expect(a.code == .permissionDenied)
        // root may.
        var root = h.session(uid: 0)
        #expect(throws: Never.self) { try h.send(&root, .attach(runID: run.runID!))?.get() }
    }

    @Test func endingTheEvaluationEndsOpenChainsWithTheSameStatus() throws {
        var h = SessionHarness()
        var s = h.session()
        h.send(&s, .evaluation(id: 1, name: "eval", description: nil))
        h.send(&s, .chain(id: 2, evaluation: 1, name: "a"))
        let chain = try h.descriptor(&s, .start(.chain(2)))
        _ = try h.send(&s, .end(.evaluation(1), status: .killed, endTime: 77))?.get()
        #expect(h.registry.entry(chain.handle)?.status == .killed)
        #expect(h.registry.entry(chain.parentHandle!)?.status == .killed)
        #expect(h.records(of: chain.handle).last == .updateRun(status: .killed, endTime: 77))
        #expect(h.records(of: chain.parentHandle!).last == .updateRun(status: .killed, endTime: 77))
        #expect(h.records.last?.handle == chain.parentHandle)  // the chain ends first
    }

    @Test func attachReopensAFinishedRunTheDestinationHolds() throws {
        var h = SessionHarness()  // a fresh registry (as after a restart): the run is looked up
        h.stored["r1"] = StoredRun(
            runID: "r1", experimentID: "3", name: "old", userID: "user0", status: .finished, endTime: 50,
            params: ["p": "1"], tags: ["armory.handle": "hOld"])
        var s = h.session(uid: 0)
        let attached = try h.descriptor(&s, .attach(runID: "r1"))
        #expect(attached.runID == "r1" && attached.handle == "hOld" && attached.status == .running)
        #expect(h.records(of: "hOld") == [.updateRun(status: .running, endTime: 50)])
        #expect(s.record.otherRuns == ["hOld"])
        // Another user's run is not attached; a run the destination does not hold is named.
        h.stored["r2"] = StoredRun(runID: "r2", experimentID: "3", name: "theirs", userID: "bob", status: .finished, endTime: 50, params: [:], tags: [:])
        var other = h.session(uid: 1000)
        guard case .failure(let denied)? = h.send(&other, .attach(runID: "r2")), case .failure(let missing)? = h.send(&other, .attach(runID: "r3")) else {
            Issue.record("attached another user's or a missing run")
            return
        }
        #expect(denied.code == .permissionDenied && denied.message.contains("bob"))
        #expect(missing.code == .notFound && missing.message.contains("r3") && missing.op == "attach")
    }

    @Test func artifactsAreSpooledThenQueued() throws {
        var h = SessionHarness()
        var s = h.session()
        h.send(&s, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(&s, .start(.evaluation(1)))
        let open = ClientFrame(seq: 10, op: .artifactOpen(run: run.handle, path: "exports/00000/00/a.bin"))
        guard case .openSpool(let id, let spoolPath) = s.receive(open, nowMs: 1) else {
            Issue.record("no spool file asked for")
            return
        }
        #expect(spoolPath.hasPrefix("/spool/" + run.handle))
        guard case .reply(let opened) = s.spoolOpened(artifact: id, for: open) else {
            Issue.record("open not answered")
            return
        }
        #expect(opened["artifact"] == .int(id))
        guard case .writeSpool(id, [1, 2, 3]) = s.receive(ClientFrame(seq: 11, op: .artifactChunk(artifact: id, data: [1, 2, 3])), nowMs: 1),
            case .writeSpool(id, [4]) = s.receive(ClientFrame(seq: 12, op: .artifactChunk(artifact: id, data: [4])), nowMs: 1)
        else {
            Issue.record("chunks not written")
            return
        }
        let close = ClientFrame(seq: 13, op: .artifactClose(artifact: id))
        guard case .closeSpool(id) = s.receive(close, nowMs: 1), case .reply(let closed) = s.spoolClosed(artifact: id, for: close) else {
            Issue.record("close not carried out")
            return
        }
        #expect(closed["bytes"] == .int(4))
        let committed = s.commit()
        #expect(committed?.records.map(\.record) == [.artifact(path: "exports/00000/00/a.bin", spoolPath: spoolPath)])
        // A resent close is answered as the first time, and queues nothing again.
        guard case .reply(let again) = s.receive(close, nowMs: 1) else {
            Issue.record("resent close not answered")
            return
        }
        #expect(again == closed)
    }

    @Test func aSpoolFileThatCannotBeWrittenDiscardsTheArtifact() throws {
        var h = SessionHarness()
        var s = h.session()
        h.send(&s, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(&s, .start(.evaluation(1)))
        let opened = try h.reply(&s, .artifactOpen(run: run.handle, path: "a.bin"))
        let id = try #require(opened["artifact"]?.intValue)
        let chunk = ClientFrame(seq: 20, op: .artifactChunk(artifact: id, data: [1]))
        _ = s.receive(chunk, nowMs: 1)
        guard case .error(let e) = s.spoolFailed(artifact: id, reason: "No space left on device", for: chunk) else {
            Issue.record("failure not reported")
            return
        }
        #expect(e.code == .internalError && e.message.contains("a.bin") && e.message.contains("No space") && e.seq == 20)
        guard case .failure(let gone)? = h.send(&s, .artifactClose(artifact: id), seq: 21) else {
            Issue.record("closed a discarded artifact")
            return
        }
        #expect(gone.code == .unknownHandle)
        #expect(s.record.openArtifacts.isEmpty)
    }

    @Test(arguments: ["../escape", "/abs", "a//b", "", "a/../../b"])
    func artifactPathsMustStayInsideTheRun(_ path: String) throws {
        var h = SessionHarness()
        var s = h.session()
        h.send(&s, .evaluation(id: 1, name: "eval", description: nil))
        let run = try h.descriptor(&s, .start(.evaluation(1)))
        guard case .failure(let e)? = h.send(&s, .artifactOpen(run: run.handle, path: path)) else {
            Issue.record("path \(path) accepted")
            return
        }
        #expect(e.code == .invalidValue)
    }
}

extension SessionAction {
    var isNone: Bool { if case .none = self { true } else { false } }
}
