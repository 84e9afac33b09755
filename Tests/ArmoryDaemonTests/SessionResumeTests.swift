import ArmoryDaemonTesting
import ArmoryProtocol
import Synchronization
import Testing

@testable import ArmoryDaemon

/// What makes a session outlive its connection, driven frame by frame without a socket: frames it
/// holds are dropped by `seq`, requests answered as the first time, and its journal record
/// restores it into a fresh state machine that goes on exactly where it was.
struct SessionResumeTests {
    @Test func framesAlreadyHeldAreDroppedAndRequestsAnsweredAsTheFirstTime() throws {
        var h = SessionHarness()
        var s = h.session()
        h.send(&s, .evaluation(id: 1, name: "resume", description: nil))
        h.send(&s, .chain(id: 2, evaluation: 1, name: "c"))
        let first = try h.reply(&s, .start(.chain(2)))
        let handle = try #require(first["handle"]?.stringValue)
        let log = ClientOp.log(run: handle, batch: LogBatch(metrics: [MetricPoint(key: "m", value: 1, step: 0, timestamp: 5)]))
        h.send(&s, log, seq: 5)
        // A client resending after a reconnect: the same start, the same log frame.
        let resent = h.send(&s, .start(.chain(2)), seq: 4)
        let again = try #require(try resent?.get())
        #expect(again["handle"]?.stringValue == handle)
        #expect(h.send(&s, log, seq: 5) == nil)
        #expect(try h.reply(&s, .end(.evaluation(1), status: .finished, endTime: nil))["status"]?.stringValue == "FINISHED")
        #expect(h.batches(of: handle).count == 1)
        #expect(h.records.filter { if case .createRun = $0.record { true } else { false } }.count == 2)
    }

    /// A restart may come while a client still only asks questions (MLflow's `set_experiment`):
    /// its session must be in the journal already, or the client could not resume it.
    @Test func aClientsSessionIsJournaledFromItsHandshakeAnAdminToolsOnlyOnceItHoldsSomething() throws {
        var h = SessionHarness()
        let s = h.session()
        guard case .session(let record)? = h.lastTail else {
            Issue.record("the handshake journaled no session record: \(String(describing: h.lastTail))")
            return
        }
        #expect(s.journaled)
        #expect(record.id == s.id && record.client == "test")
        #expect(record.seq == s.handledSeq)

        var admin = SessionStateMachine(
            number: 99, peer: PeerCredentials(uid: 0, gid: 0, pid: 7), runs: h.registry, userName: "root", spoolDirectory: "/spool")
        var hello = Hello(client: "armoryctl", clientVersion: "1", program: "armoryctl")
        hello.admin = true
        guard case .handshake(let accepted) = admin.receive(ClientFrame(seq: 1, op: .hello(hello)), nowMs: 0) else {
            Issue.record("no handshake")
            return
        }
        admin.accept(accepted, destination: .primary, assignsRunIDs: true, peer: admin.peer)
        #expect(admin.commit() == nil && !admin.journaled)
        #expect(admin.endsWithConnection)  // an admin tool never resumes: nothing waits for it
    }

    @Test func byeEndsTheSessionWithItsConnectionUnlessItIsResumed() {
        var h = SessionHarness()
        var s = h.session()
        #expect(!s.endsWithConnection)
        #expect(h.send(&s, .bye) == nil)  // fire-and-forget
        #expect(s.endsWithConnection)
        #expect(h.send(&s, .evaluation(id: 1, name: "after bye", description: nil)) == nil)  // still served
        #expect(s.tracking.evaluations[1] != nil)
        s.accept(Hello(client: "test", clientVersion: "1", program: "/t.py"), destination: .primary, assignsRunIDs: true, peer: s.peer)
        #expect(!s.endsWithConnection)  // resumed: the connection broke after all
    }

    @Test func theFirstHelloResentAfterAResumeIsDroppedButASecondHelloIsRefused() {
        var h = SessionHarness()
        var s = h.session()
        #expect(h.send(&s, .hello(Hello(client: "test", clientVersion: "1", program: "/t.py"))).map { (try? $0.get()) == nil } == true)  // twice
        var resuming = Hello(client: "test", clientVersion: "1", program: "/t.py")
        resuming.resume = .init(session: s.id, acked: 0)
        s.accept(resuming, destination: .primary, assignsRunIDs: true, peer: s.peer)
        // The client resends what it kept, its first hello included: no error for it.
        #expect(h.send(&s, .hello(Hello(client: "test", clientVersion: "1", program: "/t.py")), seq: 1) == nil)
        #expect(h.send(&s, .evaluation(id: 1, name: "resent", description: nil)) == nil && s.tracking.evaluations[1] != nil)
    }

    @Test func theJournalRecordRestoresTheSessionIntoAFreshOne() throws {
        var h = SessionHarness()
        var s = h.session()
        h.send(&s, .trackParam(key: "seed", value: "7"))
        h.send(&s, .evaluation(id: 1, name: "restored", description: "d"))
        h.send(&s, .pushContext(nested: false, trackables: true))
        h.send(&s, .chain(id: 2, evaluation: 1, name: "c"))
        h.send(&s, .trackParam(key: "eps", value: "0.1"))
        h.send(&s, .popContext)
        let run = try h.reply(&s, .start(.chain(2)))
        let opened = try h.reply(&s, .artifactOpen(run: try #require(run["handle"]?.stringValue), path: "a.bin"))
        // The latest commit journaled the session's record, as the journal writes and reads it back.
        guard case .session(let committed)? = h.lastTail else {
            Issue.record("no session record committed")
            return
        }
        #expect(committed == s.record)
        var writer = JournalFieldWriter()
        JournalCodec.encode(.session(s.record), into: &writer)
        let decoded = try writer.bytes.withUnsafeBytes { raw in
            var reader = JournalFieldReader(raw)
            return try JournalCodec.decode(&reader)
        }
        guard case .session(let record) = decoded else {
            Issue.record("not a session record")
            return
        }
        #expect(record == s.record)
        let artifact = try #require(opened["artifact"]?.intValue)
        #expect(record.seq == 9 && record.openArtifacts == [artifact])

        var restored = SessionStateMachine(restoring: record, number: 50, runs: h.registry, userName: "user1000", spoolDirectory: "/spool")
        restored.accept(Hello(client: "test", clientVersion: "1", program: "/t.py"), destination: .primary, assignsRunIDs: true, peer: s.peer)
        #expect(restored.handledSeq == 9)  // what the resume's reply names as held
        #expect(restored.id == s.id && restored.tracking == s.tracking)
        #expect(restored.tracking.globalParams == ["seed": "7"])
        #expect(try restored.tracking.chainParams(id: 2) == ["eps": "0.1"])
        // A frame it holds is dropped; the artifact that was open must be sent again.
        #expect(h.send(&restored, .trackParam(key: "seed", value: "8"), seq: 2) == nil)
        #expect(restored.tracking.globalParams["seed"] == "7")
        #expect(h.send(&restored, .artifactChunk(artifact: artifact, data: [1, 2, 3]), seq: 10) == nil)
        guard case .failure(let interrupted)? = h.send(&restored, .artifactClose(artifact: artifact), seq: 11) else {
            Issue.record("close answered")
            return
        }
        #expect(interrupted.code == .artifactInterrupted)
        // It goes on: the chain it started ends through it.
        #expect(try h.send(&restored, .end(.chain(2), status: .finished, endTime: nil), seq: 12)?.get()["status"]?.stringValue == "FINISHED")
    }

    @Test func aResumeOfASessionThatEndedIsToldSoOneNeverKnownIsNotFound() throws {
        let graceOver = Mutex<[@Sendable () -> Void]>([])
        let table = SessionTable(graceSeconds: 60, schedule: { _, body in graceOver.withLock { $0.append(body) } }, onExpired: { _, _ in })
        let id = SessionStateMachine.newSessionID()
        table.restore([
            SessionRecord(
                id: id, uid: 1000, gid: 1000, pid: 7, client: "test", program: "/t.py", systemMetrics: true, seq: 3, tracking: TrackingState(),
                evaluationRuns: [:], chainRuns: [:], otherRuns: [], replies: [:], openArtifacts: [], nextArtifactID: 1)
        ])
        for expire in graceOver.withLock({ $0 }) { expire() }  // nobody resumed it within the grace
        let claims = Mutex<[SessionTable.Claim]>([])
        for asked in [id, SessionStateMachine.newSessionID()] {
            table.claim(asked, uid: 1000, connection: 1, close: {}) { claim in claims.withLock { $0.append(claim) } }
        }
        let (expired, unknown) = try claims.withLock { (try #require($0.first), try #require($0.last)) }
        guard case .ended(let why) = expired, case .notFound = unknown else {
            Issue.record("expected ended then not found, got \(expired) and \(unknown)")
            return
        }
        #expect(why.contains("ended") && table.counts.expired == 1)
    }
}
