#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import ArmoryProtocol
import MLflow
import Foundation
import Logging

/// What the connection must do after a frame: nothing (a fire-and-forget op succeeded), answer,
/// report an error, answer later (when the sink has acted), or answer and close.
public enum SessionOutcome: Sendable {
    case none
    case reply(JSONObject)
    case error(ProtocolError)
    /// Call the continuation with the reply (or error) once it is known.
    case deferred(@Sendable (@escaping @Sendable (Result<JSONObject, ProtocolError>) -> Void) -> Void)
    /// Wait until each uploader settled its ticket (or `timeoutMs` passed), then answer a flush.
    case awaitUploaded(waits: [UploadWait], timeoutMs: Int64)
    /// Wait until each journal holds its records on disk (or `timeoutMs` passed), then answer a
    /// `flush wait=durable`.
    case awaitDurable(waits: [DurableWait], timeoutMs: Int64)
    /// Wait until run `handle` exists in MLflow (its create settled) or `timeoutMs` passed, then
    /// answer with its descriptor (`run_id` null while still pending).
    case awaitRun(handle: String, wait: UploadWait, timeoutMs: Int64)
    case close(ProtocolError)
}

/// A ticket of one uploader to wait for.
public struct UploadWait: Sendable {
    public var uploader: Uploader
    public var ticket: UInt64
}

/// A journal sequence number of one uploader to wait for.
public struct DurableWait: Sendable {
    public var uploader: Uploader
    public var lsn: UInt64
}

/// One client session's protocol logic: the handshake, its tracking state, its evaluations and
/// chains, and every op applied to the shared registry and uploader. No sockets: the channel
/// handler feeds it frames and carries out the outcomes, and tests drive it directly.
///
/// A session outlives its connection (docs/architecture.md, "Sessions outlive connections"):
/// `seq` numbers its frames across reconnects, a frame it already holds is dropped (a request is
/// answered as the first time), and each frame's records are journaled together with the
/// session's record or mark, so a restarted daemon restores it exactly as far as it was held.
/// One event loop at a time uses it: the connection it is attached to (`SessionTable` hands it over).
public final class Session: @unchecked Sendable {
    /// The connection carrying the session now (statistics, logs).
    public private(set) var connectionID: UInt64
    /// The session's id (128 random bits as hex), what `resume` names.
    public let id: String
    /// Owner token of the session's runs in the registry (`RunEntry.connection`).
    public let number: UInt64
    public private(set) var peer: PeerCredentials
    private let services: DaemonServices
    /// Sends an error to this session's connection later (from the uploader thread): the handler's job.
    private var reportLater: @Sendable (ProtocolError) -> Void

    public private(set) var hello: Hello?
    public private(set) var tracking = TrackingState()
    private var lastSeq: UInt64 = 0
    /// Runs written through MLflow's API (`create_run`, `attach`).
    private var otherRuns: [String] = []
    /// Replies of requests with effects, by `seq` (the latest `replyCacheSize`).
    private var replies: [UInt64: SessionRecord.CachedReply] = [:]
    /// Artifacts that were open when the daemon stopped: their chunks are dropped, their close
    /// asks the client to send them again.
    private var interruptedArtifacts = Set<Int64>()
    /// The session's state changed since its last journal record.
    private var dirty = false
    /// A record of the session is in the journal (its end is then journaled too).
    public private(set) var journaled = false
    /// Restored after a restart: its records before it were replayed into the uploaders, and its
    /// first resume makes `flush wait=uploaded` wait for them too.
    private var awaitsReplayedRecords = false
    /// A record waiting for `commit`, with the destination it goes to.
    private typealias PendingRecord = (destination: String?, handle: String, record: SinkRecord, completion: Uploader.Completion?)
    /// Records not yet journaled: the frame's being handled, or a read burst's metric-only frames
    /// (one pass through the uploader's and the journal's locks instead of one per frame).
    private var pending: [PendingRecord] = []
    /// The run of the previous `log` frame (already known to be one of the session's).
    private var lastLoggedRun = ""
    /// How many replies a session keeps for re-sent requests.
    static let replyCacheSize = 256
    /// The last uploader ticket of a record this connection produced, per destination (for
    /// `flush wait=uploaded`).
    private var lastTickets: [String: UInt64] = [:]
    /// The last journal sequence number of a record this connection produced, per destination
    /// (what an ack waits for).
    private var lastLSNs: [String: UInt64] = [:]
    /// Where this connection's new runs go (`nil`: the daemon's own destination).
    private var destination: String?
    private var evaluationRuns: [Int64: String] = [:]
    private var chainRuns: [Int64: String] = [:]
    private var artifacts: [Int64: OpenArtifact] = [:]
    private var nextArtifactID: Int64 = 1
    private lazy var userName = DaemonServices.userName(uid: peer.uid)
    /// Metrics accepted since the handler last reported them (one statistics update per read burst).
    private var acceptedMetrics: UInt64 = 0

    /// Metrics accepted since the last call.
    public func takeAcceptedMetrics() -> UInt64 {
        defer { acceptedMetrics = 0 }
        return acceptedMetrics
    }

    /// Metric keys already found valid on this connection (most runs log a handful of keys).
    private var validMetricKeys = Set<String>()
    /// Runs whose client logs `system/...` metrics itself (the daemon no longer samples them).
    private var clientSampledRuns = Set<String>()
    /// Set when the uploader passed its high-water mark: the connection should stop reading.
    public private(set) var wantsPause = false

    private struct OpenArtifact {
        var handle: String
        var destination: String?
        var path: String
        var spoolPath: String
        var fd: Int32
        var bytes: Int
    }

    public init(connectionID: UInt64, peer: PeerCredentials, services: DaemonServices, reportLater: @escaping @Sendable (ProtocolError) -> Void) {
        self.connectionID = connectionID
        self.peer = peer
        self.services = services
        self.reportLater = reportLater
        self.id = Self.newSessionID()
        self.number = services.sessions.nextNumber()
        services.registry.setReporter(reportLater, forConnection: number)
    }

    /// A session restored from its journal record after a restart, detached until a client resumes it.
    public init(restoring record: SessionRecord, services: DaemonServices) {
        self.connectionID = 0
        self.id = record.id
        self.number = services.sessions.nextNumber()
        self.peer = PeerCredentials(uid: record.uid, gid: record.gid, pid: record.pid)
        self.services = services
        self.reportLater = { _ in }
        self.tracking = record.tracking
        self.lastSeq = record.seq
        self.evaluationRuns = record.evaluationRuns
        self.chainRuns = record.chainRuns
        self.otherRuns = record.otherRuns
        self.replies = record.replies
        self.interruptedArtifacts = Set(record.openArtifacts)
        self.nextArtifactID = record.nextArtifactID
        self.journaled = true
        self.awaitsReplayedRecords = true
    }

    /// 128 random bits as 32 lowercase hex digits.
    static func newSessionID() -> String {
        var generator = SystemRandomNumberGenerator()
        return String(format: "%016llx%016llx", generator.next() as UInt64, generator.next() as UInt64)
    }

    /// The session continues on another connection (a resume): replies and errors go there now.
    public func attach(connectionID: UInt64, peer: PeerCredentials, reportLater: @escaping @Sendable (ProtocolError) -> Void) {
        self.connectionID = connectionID
        self.peer = peer
        self.reportLater = reportLater
        services.registry.setReporter(reportLater, forConnection: number)
    }

    /// What the journal keeps of the session.
    public var record: SessionRecord {
        SessionRecord(id: id, uid: peer.uid, gid: peer.gid, pid: peer.pid, client: hello?.client ?? "", program: hello?.program ?? "",
                      systemMetrics: hello?.systemMetrics ?? true, seq: lastSeq, tracking: tracking, evaluationRuns: evaluationRuns,
                      chainRuns: chainRuns, otherRuns: otherRuns, replies: replies, openArtifacts: Array(artifacts.keys) + interruptedArtifacts,
                      nextArtifactID: nextArtifactID)
    }

    /// Whether the session holds nothing worth restoring (a status query, say).
    private var isTrivial: Bool {
        tracking == TrackingState() && evaluationRuns.isEmpty && chainRuns.isEmpty && otherRuns.isEmpty && replies.isEmpty && artifacts.isEmpty
    }

    /// The highest `seq` handled so far (what an ack may cover).
    public var handledSeq: UInt64 { lastSeq }

    /// What must be on disk before everything handled so far may be acknowledged.
    /// The uploaders of every destination this session wrote to.
    public var destinationsWritten: [Uploader] {
        lastLSNs.keys.map { services.destinations.uploader($0.isEmpty ? nil : $0) }
    }

    public var durabilityWaits: [DurableWait] {
        lastLSNs.compactMap { key, lsn in lsn > 0 ? DurableWait(uploader: services.destinations.uploader(key.isEmpty ? nil : key), lsn: lsn) : nil }
    }

    public func clearPause() { wantsPause = false }

    /// Handles one decoded frame.
    public func handle(_ frame: ClientFrame, nowMs: Int64) -> SessionOutcome {
        if case .hello = frame.op {} else if frame.seq <= lastSeq {
            return duplicate(frame, nowMs: nowMs)
        }
        let metricsOnly: Bool
        if case .log(_, let batch) = frame.op, batch.params.isEmpty, batch.tags.isEmpty { metricsOnly = true } else { metricsOnly = false }
        if !metricsOnly {
            commit()  // every other op sees the records before it in the uploader
        }
        // `hello` stays outside the session's numbering: a resuming client's hello comes before
        // the frames it resends.
        if case .hello = frame.op {} else { lastSeq = frame.seq }
        var outcome: SessionOutcome
        do {
            outcome = try dispatch(frame.op, seq: frame.seq, nowMs: nowMs)
        } catch {
            outcome = .error(error)
        }
        switch outcome {  // an error (also the one before a close) names the frame it answers
        case .error(let error): outcome = .error(error.answering(frame))
        case .close(let error): outcome = .close(error.answering(frame))
        default: break
        }
        if metricsOnly { return outcome }  // committed at the end of the read burst
        remember(outcome, of: frame)
        commit()
        // A run created by this frame: `createRun` could not know its ticket (ticket 0) before
        // the frame's records were journaled just now; wait for exactly that one.
        if case .awaitRun(let handle, var wait, let timeoutMs) = outcome, wait.ticket == 0 {
            wait.ticket = lastTickets[services.registry.entry(handle)?.destination ?? ""] ?? wait.uploader.lastTicket
            outcome = .awaitRun(handle: handle, wait: wait, timeoutMs: timeoutMs)
        }
        return outcome
    }

    /// A frame that could not be read (broken JSON, a missing member, too large): its error names
    /// the `seq` read from it, else the next one the session expects, and the frame counts as
    /// answered. `nil`: a resent copy of a fire-and-forget frame already answered (dropped).
    public func refuseUnreadable(_ error: ProtocolError) -> ProtocolError? {
        var error = error
        guard error.op != "hello" else { return error }  // outside the numbering
        if let seq = error.seq, seq <= lastSeq {
            return ClientOp.requestNames.contains(error.op ?? "") ? error : nil
        }
        let seq = error.seq ?? lastSeq + 1
        error.seq = seq
        lastSeq = seq
        return error
    }

    /// A frame this session already holds (a client resending after a reconnect): dropped, and a
    /// request answered as it was the first time.
    private func duplicate(_ frame: ClientFrame, nowMs: Int64) -> SessionOutcome {
        guard frame.op.expectsReply else { return .none }
        switch replies[frame.seq] {
        case .reply(let body)?:
            return .reply(body)
        case .run(let handle)?:
            guard let entry = services.registry.entry(handle) else { return .reply([:]) }
            let uploader = services.destinations.uploader(entry.destination)
            return .awaitRun(handle: handle, wait: UploadWait(uploader: uploader, ticket: uploader.lastTicket), timeoutMs: Self.startWaitMs)
        case .error(var error)?:
            error.seq = frame.seq
            error.op = frame.op.name
            return .error(error)
        case nil:
            break
        }
        switch frame.op {
        case .start, .createRun, .artifactOpen, .artifactClose, .sync:
            return .error(ProtocolError(.invalidState, "Request seq \(frame.seq) ('\(frame.op.name)') was handled already and its reply is no longer kept (the daemon keeps the last \(Self.replyCacheSize)); the client resent it too late. Check the run with run_info.", seq: frame.seq, op: frame.op.name))
        default:
            // Queries, flushes, `end` and `attach` give the same answer when asked again.
            do {
                let outcome = try dispatch(frame.op, seq: frame.seq, nowMs: nowMs)
                commit()
                return outcome
            } catch {
                return .error(error.answering(frame))
            }
        }
    }

    /// Keeps the answer to a request whose effects cannot be asked for again.
    private func remember(_ outcome: SessionOutcome, of frame: ClientFrame) {
        switch frame.op {
        case .start, .createRun, .artifactOpen, .artifactClose, .sync: break
        default: return
        }
        let reply: SessionRecord.CachedReply
        switch outcome {
        case .reply(let body): reply = .reply(body)
        case .awaitRun(let handle, _, _): reply = .run(handle: handle)
        case .error(let error): reply = .error(error)
        default: return
        }
        replies[frame.seq] = reply
        if replies.count > Self.replyCacheSize, let oldest = replies.keys.min() { replies[oldest] = nil }
        dirty = true
    }

    /// Journals and queues the pending records together with the session's record (when its state
    /// changed) or its mark (its `seq`), so that a restart restores the session exactly as far as
    /// its records go. `handle` calls it before and after every frame that is not metric-only; the
    /// handler at the end of every read burst and when the connection closes.
    public func commit() {
        let writeRecord = dirty && (journaled || !pending.isEmpty || !isTrivial)
        guard !pending.isEmpty || writeRecord else { return }
        if writeRecord {
            dirty = false
            journaled = true
        }
        let tail: JournalEntry? = writeRecord ? .session(record) : journaled ? .sessionMark(id: id, seq: lastSeq) : nil
        enqueue(groups: pending, tail: tail)
        pending.removeAll(keepingCapacity: true)
    }

    /// Enqueues records per destination in order, the session's tail with its own destination's.
    private func enqueue(groups records: [PendingRecord], tail: JournalEntry?) {
        var start = 0
        var tailWritten = tail == nil
        while start < records.count {
            let destination = records[start].destination
            var end = start + 1
            while end < records.count && records[end].destination == destination { end += 1 }
            let isHome = destination == self.destination && !tailWritten
            let done = services.destinations.uploader(destination).enqueue(records[start..<end].map { ($0.handle, $0.record, $0.completion) }, tail: isHome ? tail : nil, uid: peer.uid)
            if isHome { tailWritten = true }
            noteEnqueued(done, to: destination)
            start = end
        }
        if !tailWritten, let tail {
            noteEnqueued(services.destinations.uploader(destination).enqueue([], tail: tail), to: destination, records: false)
        }
    }

    private func dispatch(_ op: ClientOp, seq: UInt64, nowMs: Int64) throws(ProtocolError) -> SessionOutcome {
        if case .hello(let h) = op { return try handshake(h) }
        guard hello != nil else {
            throw ProtocolError(.helloRequired, "Send \"hello\" first: every connection opens with the handshake (proto/PROTOCOL.md).")
        }
        switch op {
        case .hello: preconditionFailure("handled above")
        case .trackParam(let key, let value):
            try MLflowRules.validateKey(key, kind: .param)
            try MLflowRules.validateParamValue(value, key: key)
            tracking.trackParam(key: key, value: value)
            dirty = true
            try syncGlobalParams(keys: [key])
        case .trackParams(let prefix, let function, let values):
            try MLflowRules.validateKey(prefix + "._func", kind: .param)
            for (key, value) in values {
                try MLflowRules.validateKey(prefix + "." + key, kind: .param)
                try MLflowRules.validateParamValue(value, key: prefix + "." + key)
            }
            tracking.trackParams(prefix: prefix, function: function, values: values)
            dirty = true
            try syncGlobalParams(keys: [prefix + "._func"] + values.keys.map { prefix + "." + $0 })
        case .resetParams:
            tracking.resetParams()
            dirty = true
        case .pushContext(let nested, let trackables):
            tracking.pushContext(nested: nested, trackables: trackables)
            dirty = true
        case .popContext:
            try tracking.popContext()
            dirty = true
        case .trackable(let id):
            try tracking.registerTrackable(id: id)
            dirty = true
        case .evaluation(let id, let name, let description):
            try tracking.defineEvaluation(id: id, name: name, description: description)
            dirty = true
        case .chain(let id, let evaluation, let name):
            try tracking.defineChain(id: id, evaluation: evaluation, name: name)
            dirty = true
        case .use(let target, let role, let ids, let append):
            try tracking.use(target: target, role: role, ids: ids, append: append)
            dirty = true
        case .getParams:
            return .reply(["params": .object(tracking.currentParams.mapValues { .string($0) })])
        case .getTrackable(let id):
            // A chain answers with what its nested run gets: its own params merged with its components'.
            let params = tracking.chains[id] != nil ? try tracking.chainParams(id: id) : try tracking.params(ofTrackable: id)
            return .reply(["params": .object(params.mapValues { .string($0) })])
        case .start(let target):
            return try start(target, nowMs: nowMs)
        case .end(let target, let status, let endTime):
            return .reply(try end(target, status: status, nowMs: endTime ?? nowMs))
        case .experiment(let name, let create):
            try MLflowRules.validateExperimentName(name)
            let uploader = services.destinations.uploader(destination)
            return .deferred { reply in
                uploader.callSink({ (sink) async throws(ProtocolError) in try await sink.experiment(named: name, create: create) }) { result in
                    reply(result.map { id in ["experiment_id": id.map { .string($0) } ?? .null] })
                }
            }
        case .setExperimentTag(let experimentID, let key, let value):
            try MLflowRules.validateKey(key, kind: .tag)
            try MLflowRules.validateTagValue(value, key: key, limit: MLflowRules.maxExperimentTagValueLength)
            let uploader = services.destinations.uploader(destination)
            return .deferred { reply in
                uploader.callSink({ (sink) async throws(ProtocolError) in
                    try await sink.setExperimentTag(experimentID: experimentID, key: key, value: value)
                }) { result in
                    reply(result.map { [:] })
                }
            }
        case .deleteTag(let handle, let key):
            try MLflowRules.validateKey(key, kind: .tag)
            let run = try ownedRun(handle)
            let report = reportLater
            enqueue(run.handle, .deleteTag(key: key), to: run.destination) { result in
                if case .failure(var error) = result {
                    error.op = "delete_tag"
                    report(error)
                }
            }
        case .createRun(let experimentID, let runName, let startTime, let tags):
            return try createStandaloneRun(experimentID: experimentID, runName: runName, startTime: startTime ?? nowMs, tags: tags)
        case .attach(let runID):
            return try attach(runID: runID)
        case .runInfo(let handle, let waitMs):
            let run = try ownedRun(handle)
            if run.runID == nil, run.failure == nil, waitMs > 0 {
                let uploader = services.destinations.uploader(run.destination)
                return .awaitRun(handle: handle, wait: UploadWait(uploader: uploader, ticket: uploader.lastTicket), timeoutMs: waitMs)
            }
            if let failure = run.failure { throw failure }
            return .reply(run.descriptor.json)
        case .log(let handle, let batch):
            try log(handle: handle, batch: batch)
        case .artifactOpen(let handle, let path):
            return .reply(try openArtifact(handle: handle, path: path))
        case .artifactChunk(let id, let data):
            try writeChunk(artifact: id, data: data)
        case .artifactClose(let id):
            return .reply(try closeArtifact(id))
        case .flush(let level, let timeoutMs):
            if level == .durable {
                return .awaitDurable(waits: durabilityWaits, timeoutMs: max(0, timeoutMs))
            }
            let waits = lastTickets.map { UploadWait(uploader: services.destinations.uploader($0.key.isEmpty ? nil : $0.key), ticket: $0.value) }
            return .awaitUploaded(waits: waits, timeoutMs: max(0, timeoutMs))
        case .status:
            return .reply(StatusReport.make(services: services, viewer: peer))
        case .sync(let request):
            return .reply(try startSync(request))
        case .syncStatus:
            return .reply(["jobs": .array(services.syncs.all.map(\.json))])
        case .deadLetters(let runID, let retry):
            return .reply(deadLetters(runID: runID, retry: retry))
        }
        return .none
    }

    // MARK: Dead letters

    /// `armoryctl errors`: the dead letters of every destination (the caller's own, unless it is
    /// an admin: root, the daemon's user, or in the admin group), of one run when `runID` is given; `retry` queues them again.
    private func deadLetters(runID: String?, retry: Bool) -> JSONObject {
        let everyone = services.isAdmin(peer)
        var listed: [DeadLetterLine] = []
        var files: [String] = []
        for uploader in services.destinations.all {
            guard let file = uploader.deadLetters, !files.contains(file.path) else { continue }
            files.append(file.path)
            let selected = file.lines.filter { (everyone || $0.uid == peer.uid) && (runID == nil || $0.runID == runID) }
            if retry { uploader.retry(selected) }
            listed += selected
        }
        var reply: JSONObject = ["dead_letters": .array(listed.map { .object($0.json) }), "files": .array(files.map { .string($0) })]
        if retry { reply["requeued"] = .int(Int64(listed.count)) }
        return reply
    }

    // MARK: Sync

    /// Starts copying a local store into this connection's destination (its hello's tracking
    /// URI and credentials). Another user's path is not read for them: only the daemon's own
    /// store, or a path of a client running as the daemon's user (or root).
    private func startSync(_ request: SyncRequest) throws(ProtocolError) -> JSONObject {
        let uploader = services.destinations.uploader(destination)
        if destination == nil, let uri = hello?.trackingURI, !uri.isEmpty, !uri.hasPrefix("armoryd:"), !MLflowDestination.isRemote(uri), peer.uid != getuid() {
            throw ProtocolError(.permissionDenied, "armoryd runs as uid \(getuid()) and does not write to \(uri) for uid \(peer.uid): sync into an MLflow server, or into your own store with your own daemon (a user unit).")
        }
        guard uploader.destination.hasPrefix("http") || uploader.destination.hasPrefix("file://") else {
            throw ProtocolError(.invalidValue, "sync needs an MLflow server (--to http(s)://…) or a local store (--to PATH) as its destination; this connection's destination is \(uploader.destination).")
        }
        let source: String
        if let from = request.from {
            guard peer.uid == getuid() || peer.uid == 0 else {
                throw ProtocolError(.permissionDenied, "armoryd runs as uid \(getuid()) and does not read \(from) for uid \(peer.uid): sync your own store with your own daemon (a user unit), or ask an admin.")
            }
            source = from
        } else {
            guard let own = services.syncs.localStore else {
                throw ProtocolError(.invalidValue, "This daemon has no local store (it writes to \(services.uploader.destination)): name one with --from PATH.")
            }
            source = own
        }
        do throws(FileStoreError) { _ = try FileStoreReader(root: source) } catch { throw ProtocolError(.invalidValue, error.description) }
        if uploader.destination.hasPrefix("file://"), Self.samePath(String(uploader.destination.dropFirst(7)), source) {
            throw ProtocolError(.invalidValue, "\(source) is both the source and the destination: name another store with --from or --to.")
        }
        let job = services.syncs.start(request, source: source, uploader: uploader, spoolDirectory: services.spoolDirectory, logger: services.logger)
        return ["job": job.json]
    }

    private static func samePath(_ a: String, _ b: String) -> Bool {
        URL(fileURLWithPath: a).resolvingSymlinksInPath().standardizedFileURL == URL(fileURLWithPath: b).resolvingSymlinksInPath().standardizedFileURL
    }

    // MARK: Handshake

    private func handshake(_ h: Hello) throws(ProtocolError) -> SessionOutcome {
        guard hello == nil else {
            throw ProtocolError(.invalidState, "\"hello\" was already sent on this connection.")
        }
        guard ProtocolVersion.supported.contains(h.protocolVersion) else {
            return .close(ProtocolError(.unsupportedProtocol, "Protocol \(h.protocolVersion) is not supported: this armoryd \(DaemonServices.version) speaks \(ProtocolVersion.supported.lowerBound)...\(ProtocolVersion.supported.upperBound). Upgrade the client library or the daemon so that they share a version."))
        }
        destination = try services.destinations.resolve(trackingURI: h.trackingURI, credentials: h.credentials, peerUID: peer.uid)
        hello = h
        dirty = true
        if !h.admin { services.statistics.connected(.init(connection: connectionID, peer: peer, client: "\(h.client) \(h.clientVersion)", program: h.program)) }
        let resumed: HelloReply.Resumed? = h.resume.map { _ in .notResumed(reason: notResumedReason ?? "unknown") }
        return .reply(helloReply(h, resumed: resumed).json)
    }

    /// Why a `resume` in this connection's `hello` opened a new session instead (set by the handler).
    public var notResumedReason: String?

    private func helloReply(_ h: Hello, resumed: HelloReply.Resumed?) -> HelloReply {
        let destinationURI = services.destinations.uploader(destination).destination.split(separator: " ").first.map(String.init)
        return HelloReply(daemonVersion: DaemonServices.version, protocolVersion: h.protocolVersion, limits: services.limits, uid: peer.uid, pid: peer.pid,
                          destination: destinationURI, session: id, resumed: resumed)
    }

    /// A client continues this session on a new connection (`hello` with `resume`): its frames
    /// after `held` are expected again, its runs are its own again.
    public func resume(_ h: Hello, seq: UInt64) -> SessionOutcome {
        guard ProtocolVersion.supported.contains(h.protocolVersion) else { return handle(ClientFrame(seq: seq, op: .hello(h)), nowMs: 0) }
        do {
            destination = try services.destinations.resolve(trackingURI: h.trackingURI, credentials: h.credentials, peerUID: peer.uid)
        } catch var error {
            error.seq = seq
            error.op = "hello"
            return .error(error)
        }
        hello = h
        if !h.admin { services.statistics.connected(.init(connection: connectionID, peer: peer, client: "\(h.client) \(h.clientVersion)", program: h.program)) }
        let handles = record.runHandles
        services.registry.reattach(handles, connection: number, clientPID: peer.pid)
        if awaitsReplayedRecords {
            // What the journal replayed of its runs is queued up to each uploader's last ticket.
            for entry in handles.compactMap({ services.registry.entry($0) }) {
                let key = entry.destination ?? ""
                lastTickets[key] = max(lastTickets[key] ?? 0, services.destinations.uploader(entry.destination).lastTicket)
            }
            awaitsReplayedRecords = false
        }
        services.logger.info("session resumed", metadata: ["session": "\(id)", "held": "\(lastSeq)", "client_pid": "\(peer.pid)", "uid": "\(peer.uid)"])
        return .reply(helloReply(h, resumed: .continued(held: lastSeq)).json)
    }

    // MARK: Runs

    private func baseTags(runName: String, handle: String) -> StringMap {
        [
            "mlflow.user": userName,
            "mlflow.source.name": hello?.program ?? "",
            "mlflow.source.type": "LOCAL",
            "mlflow.runName": runName,
            "armory.handle": handle,
        ]
    }

    /// Registers a run and enqueues its creation and its initial params; the registry learns
    /// its MLflow ids when the sink has created it.
    private func createRun(name: String, experiment: String, experimentID: String? = nil, parent: RunEntry?, tags extraTags: StringMap, params: StringMap, nowMs: Int64) -> (RunEntry, UInt64) {
        let handle = DaemonServices.newHandle()
        let runID = services.destinations.uploader(destination).assignsRunIDs ? DaemonServices.newRunID() : nil
        var tags = experimentID == nil ? baseTags(runName: name, handle: handle) : ["armory.handle": handle]
        for (k, v) in extraTags { tags[k] = v }
        var entry = RunEntry(handle: handle, runID: runID, experimentID: nil, experimentName: experiment, name: name,
                             ownerUID: peer.uid, status: .running, parentHandle: parent?.handle, params: params,
                             connection: number, clientPID: peer.pid)
        entry.destination = destination
        // An evaluation's runs are sampled by default; a run of MLflow's API as MLflow samples it:
        // by MLflow's own monitor, when the code asks for it (the daemon then stays out of it).
        entry.systemMetrics = (hello?.systemMetrics ?? true) && (Self.systemMetricsWanted(tags) ?? (experimentID == nil))
        services.registry.insert(entry)
        let registry = services.registry
        var creation = RunCreation(handle: handle, runID: runID, experimentName: experiment, name: name, userID: userName,
                                   startTime: nowMs, tags: tags, parentHandle: parent?.handle)
        creation.experimentID = experimentID
        creation.ownerUID = peer.uid
        creation.clientPID = peer.pid
        let report = reportLater
        enqueue(handle, .createRun(creation), to: destination) { result in
            switch result {
            case .success(let binding?):
                _ = try? registry.update(handle) { e in
                    e.runID = binding.runID
                    e.experimentID = binding.experimentID
                }
            case .success(nil):
                break
            case .failure(let error):
                _ = try? registry.update(handle) { e in
                    e.failure = error
                    e.status = .failed
                }
                report(ProtocolError(error.code, "Run '\(name)' could not be created: \(error.message)", op: "start"))
            }
        }
        if !params.isEmpty { enqueue(handle, .log(LogBatch(params: params)), to: destination) }
        services.logger.info("run started", metadata: runMetadata(entry))
        dirty = true
        return (entry, 0)  // the frame's commit gives the ticket (see `handle`)
    }

    /// The tag `armory.system_metrics` (`off`/`false`/`0` turn the daemon's system metrics off).
    static func systemMetricsWanted(_ tags: StringMap) -> Bool? {
        tags["armory.system_metrics"].map { !["off", "false", "0", "no"].contains($0.lowercased()) }
    }

    /// What the log says about a run: journald fields `RUN_ID`, `EVALUATION`, `RUN`, `CLIENT_PID`, `UID`.
    private func runMetadata(_ entry: RunEntry) -> Logger.Metadata {
        ["run_id": "\(entry.runID ?? "pending")", "handle": "\(entry.handle)", "evaluation": "\(entry.experimentName)",
         "run": "\(entry.name)", "client_pid": "\(entry.clientPID)", "uid": "\(entry.ownerUID)"]
    }

    /// MLflow's `create_run` (clients speaking MLflow's API): the run is created at once, and the
    /// reply waits (bounded) for MLflow's id, which MLflow code needs before it goes on.
    private func createStandaloneRun(experimentID: String, runName: String?, startTime: Int64, tags: StringMap) throws(ProtocolError) -> SessionOutcome {
        for (key, value) in tags {
            try MLflowRules.validateKey(key, kind: .tag)
            try MLflowRules.validateTagValue(value, key: key)
        }
        let name = runName ?? tags["mlflow.runName"] ?? ""
        let parent = tags["mlflow.parentRunId"].flatMap { services.registry.entry(runID: $0) }
        var extra = tags
        if parent != nil { extra.removeValue(forKey: "mlflow.parentRunId") }  // the uploader adds the bound id
        let (entry, ticket) = createRun(name: name, experiment: "", experimentID: experimentID, parent: parent, tags: extra, params: [:], nowMs: startTime)
        otherRuns.append(entry.handle)
        let wait = UploadWait(uploader: services.destinations.uploader(entry.destination), ticket: ticket)
        return .awaitRun(handle: entry.handle, wait: wait, timeoutMs: Self.createRunWaitMs)
    }

    /// How long MLflow's `create_run` waits for the server's id.
    static let createRunWaitMs: Int64 = 10_000

    /// Starts the evaluation's parent run if it is not running yet; returns its handle.
    private func ensureParent(evaluation id: Int64, nowMs: Int64) throws(ProtocolError) -> (handle: String, ticket: UInt64?) {
        if let handle = evaluationRuns[id] { return (handle, nil) }
        guard let config = tracking.evaluations[id] else {
            throw ProtocolError(.unknownHandle, "No evaluation with id \(id) on this connection: send \"evaluation\" first.")
        }
        var tags = StringMap()
        if let description = config.description, !description.isEmpty { tags["mlflow.note.content"] = description }
        let (entry, ticket) = createRun(name: config.name, experiment: config.name, parent: nil, tags: tags, params: tracking.globalParams, nowMs: nowMs)
        evaluationRuns[id] = entry.handle
        return (entry.handle, ticket)
    }

    private func start(_ target: RunTarget, nowMs: Int64) throws(ProtocolError) -> SessionOutcome {
        let handle: String
        let ticket: UInt64?
        switch target {
        case .evaluation(let id):
            (handle, ticket) = try ensureParent(evaluation: id, nowMs: nowMs)
        case .chain(let id):
            guard let chain = tracking.chains[id] else {
                throw ProtocolError(.unknownHandle, "No chain with id \(id) on this connection: send \"chain\" first.")
            }
            if let existing = chainRuns[id] {
                guard let entry = services.registry.entry(existing), entry.status == .running else {
                    throw ProtocolError(.invalidState, "Chain '\(chain.name)' has already run and ended; add a new chain to run it again.")
                }
                return .reply(entry.descriptor.json)
            }
            let parentHandle = try ensureParent(evaluation: chain.evaluation, nowMs: nowMs).handle
            let parent = services.registry.entry(parentHandle)
            let params = try tracking.chainParams(id: id)
            let (entry, createTicket) = createRun(name: chain.name, experiment: parent?.experimentName ?? "", parent: parent, tags: [:], params: params, nowMs: nowMs)
            chainRuns[id] = entry.handle
            handle = entry.handle
            ticket = createTicket
        case .run:
            throw ProtocolError(.invalidValue, "\"start\" takes an evaluation or a chain; to continue an existing run use \"attach\".")
        }
        return describeWhenCreated(handle: handle, ticket: ticket)
    }

    /// Answers with the run's descriptor once the sink has created it (bounded: a start never
    /// waits long on an unreachable server; `run_info` with `wait_ms` asks again later).
    private func describeWhenCreated(handle: String, ticket: UInt64?) -> SessionOutcome {
        guard let ticket, let entry = services.registry.entry(handle) else { return .reply(services.registry.entry(handle)?.descriptor.json ?? [:]) }
        return .awaitRun(handle: handle, wait: UploadWait(uploader: services.destinations.uploader(entry.destination), ticket: ticket), timeoutMs: Self.startWaitMs)
    }

    /// How long `start` waits for the server to create the run before answering with a pending id.
    static let startWaitMs: Int64 = 2000

    private func end(_ target: RunTarget, status: RunStatus, nowMs: Int64) throws(ProtocolError) -> JSONObject {
        var handles: [String] = []
        switch target {
        case .chain(let id):
            guard let handle = chainRuns[id] else {
                throw ProtocolError(.invalidState, "Chain \(id) was never started on this connection.")
            }
            handles = [handle]
        case .evaluation(let id):
            guard let handle = evaluationRuns[id] else {
                throw ProtocolError(.invalidState, "Evaluation \(id) was never started on this connection.")
            }
            // Ending the evaluation ends every chain still open, with the same status.
            for (chainID, chainHandle) in chainRuns where tracking.chains[chainID]?.evaluation == id {
                handles.append(chainHandle)
            }
            handles.append(handle)
        case .run(let handle):
            _ = try ownedRun(handle)
            handles = [handle]
        }
        var last: RunEntry?
        for handle in handles {
            let ended: RunEntry? = try services.registry.update(handle) { entry in
                guard entry.status == .running else { return nil }
                entry.status = status
                entry.endTime = nowMs
                return entry
            } ?? nil
            if let ended {
                enqueue(handle, .updateRun(status: status, endTime: nowMs), to: ended.destination)
                var metadata = runMetadata(ended)
                metadata["status"] = "\(status.rawValue)"
                services.logger.info("run ended", metadata: metadata)
            }
            last = services.registry.entry(handle)
        }
        return last?.descriptor.json ?? [:]
    }

    /// MLflow's `start_run(run_id=…)`: the run becomes RUNNING again and this connection writes it.
    private func attach(runID: String) throws(ProtocolError) -> SessionOutcome {
        let registry = services.registry
        let connection = number
        if let entry = registry.entry(runID: runID) {
            try checkOwner(entry)
            if !otherRuns.contains(entry.handle) {
                otherRuns.append(entry.handle)
                dirty = true
            }
            let (reply, ticket) = Self.reattach(entry, connection: connection, registry: registry, uploader: services.destinations.uploader(entry.destination))
            if let ticket { lastTickets[entry.destination ?? "", default: 0] = ticket }
            return .reply(reply)
        }
        let uploader = services.destinations.uploader(destination)
        let destination = destination
        let uid = peer.uid
        let name = userName
        let pid = peer.pid
        return .deferred { reply in
            uploader.findRun(runID: runID) { stored in
                guard let stored else {
                    reply(.failure(ProtocolError(.notFound, "No run with id '\(runID)' in \(uploader.destination): check the id (armoryctl status lists active runs).")))
                    return
                }
                guard uid == 0 || stored.userID == name else {
                    reply(.failure(ProtocolError(.permissionDenied, "Permission denied: run \(runID) belongs to user '\(stored.userID)'; only that user or root can write to it.")))
                    return
                }
                var entry = RunEntry(handle: stored.tags["armory.handle"] ?? DaemonServices.newHandle(), runID: stored.runID, experimentID: stored.experimentID,
                                     experimentName: "", name: stored.name, ownerUID: uid, status: stored.status,
                                     parentHandle: nil, params: stored.params, connection: connection, clientPID: pid)
                entry.endTime = stored.endTime
                entry.destination = destination
                // Another connection may have attached it meanwhile: keep the first registration.
                let registered = registry.entry(runID: runID) ?? { registry.insert(entry); return entry }()
                uploader.attach(registered)
                reply(.success(Self.reattach(registered, connection: connection, registry: registry, uploader: uploader).reply))
            }
        }
    }

    /// Marks a run RUNNING again (keeping its previous end time, as MLflow does) and owned by `connection`.
    private static func reattach(_ entry: RunEntry, connection: UInt64, registry: RunRegistry, uploader: Uploader) -> (reply: JSONObject, ticket: UInt64?) {
        let updated = (try? registry.update(entry.handle) { e in
            e.connection = connection
            e.status = .running
            return e
        }) ?? nil
        var ticket: UInt64?
        if entry.status != .running {
            ticket = uploader.enqueue(entry.handle, .updateRun(status: .running, endTime: entry.endTime)).ticket
        }
        return ((updated ?? entry).descriptor.json, ticket)
    }

    private func checkOwner(_ entry: RunEntry) throws(ProtocolError) {
        guard peer.uid == 0 || entry.ownerUID == peer.uid else {
            throw ProtocolError(.permissionDenied, "Permission denied: run \(entry.runID ?? entry.handle) belongs to uid \(entry.ownerUID); only that user or root can write to it.")
        }
    }

    private func ownedRun(_ handle: String) throws(ProtocolError) -> RunEntry {
        guard let entry = services.registry.entry(handle) else {
            throw ProtocolError(.unknownHandle, "Unknown run handle '\(handle)': use the handle returned by start or attach.")
        }
        try checkOwner(entry)
        return entry
    }

    /// Validates a batch, keeps what is valid, and reports the first problem (naming the key).
    private func log(handle: String, batch: LogBatch) throws(ProtocolError) {
        let run = try ownedRun(handle)
        if run.status != .running, evaluationRuns.values.contains(handle) || chainRuns.values.contains(handle) {
            // An Armory evaluation or chain is over once ended (MLflow's API, `otherRuns`, may
            // still log to a finished run, as MLflow itself allows).
            let what = chainRuns.values.contains(handle) ? "Chain" : "Evaluation"
            throw ProtocolError(.invalidState, "\(what) run '\(run.name)' already ended (\(run.status.rawValue)): nothing more is logged to it. Log before ending it, or start a new chain.", key: batch.metrics.first?.key ?? batch.params.keys.first ?? batch.tags.keys.first)
        }
        if handle != lastLoggedRun {
            // A run attached through a server lookup (answered off this loop) becomes the session's here.
            if !evaluationRuns.values.contains(handle) && !chainRuns.values.contains(handle) && !otherRuns.contains(handle) {
                otherRuns.append(handle)
                dirty = true
            }
            lastLoggedRun = handle
        }
        var valid = LogBatch()
        var firstError: ProtocolError?
        var rejected = 0
        valid.metrics.reserveCapacity(batch.metrics.count)
        for metric in batch.metrics {
            // The client runs its own monitor (MLflow's SystemMetricsMonitor through armoryd://):
            // the daemon stops sampling that run, so that no step is logged twice.
            if metric.key.utf8.first == UInt8(ascii: "s"), metric.key.hasPrefix("system/"), !clientSampledRuns.contains(handle) {
                clientSampledRuns.insert(handle)
                _ = try? services.registry.update(handle) { $0.systemMetrics = false }
            }
            do throws(ProtocolError) {
                if !validMetricKeys.contains(metric.key) {
                    try MLflowRules.validateKey(metric.key, kind: .metric)
                    if validMetricKeys.count < 4096 { validMetricKeys.insert(metric.key) }
                }
                if metric.timestamp < 0 { try MLflowRules.validateMetric(metric) }
                valid.metrics.append(metric)
            } catch {
                firstError = firstError ?? error
                rejected += 1
            }
        }
        if let wanted = Self.systemMetricsWanted(batch.tags) {
            _ = try? services.registry.update(handle) { $0.systemMetrics = wanted }
        }
        for (key, value) in batch.tags {
            do throws(ProtocolError) {
                try MLflowRules.validateKey(key, kind: .tag)
                try MLflowRules.validateTagValue(value, key: key)
                valid.tags[key] = value
            } catch {
                firstError = firstError ?? error
                rejected += 1
            }
        }
        let candidates = batch.params.isEmpty ? nil : try? services.registry.update(handle) { (entry: inout RunEntry) throws(ProtocolError) -> (StringMap, [ProtocolError]) in
            var accepted = StringMap()
            var errors: [ProtocolError] = []
            for (key, value) in batch.params {
                do throws(ProtocolError) {
                    try MLflowRules.validateKey(key, kind: .param)
                    try MLflowRules.validateParamValue(value, key: key)
                } catch {
                    errors.append(error)
                    continue
                }
                if let old = entry.params[key] {
                    if old != value {
                        errors.append(ProtocolError(.paramChanged, "Param '\(key)' of run \(entry.runID ?? entry.handle) was already logged as '\(old.prefix(100))'; MLflow params cannot change (new value '\(value.prefix(100))'). Use a new key, a tag, or a new run.", key: key))
                    }
                    continue
                }
                entry.params[key] = value
                accepted[key] = value
            }
            return (accepted, errors)
        }
        if let (accepted, errors) = candidates ?? nil {
            valid.params = accepted
            if let e = errors.first { firstError = firstError ?? e }
            rejected += errors.count
        }
        acceptedMetrics &+= UInt64(valid.metrics.count)
        // What the destination refuses later is a dead letter, and the uploader tells this session.
        if !valid.isEmpty { enqueue(run.handle, .log(valid), to: run.destination) }
        if var error = firstError {
            if rejected > 1 { error.message += " (\(rejected) entries of this frame were refused; the rest was logged.)" }
            throw error
        }
    }

    /// Global params set after the parent run started still go to it (MLflow params are immutable).
    /// Only `keys`, the ones the frame set, are checked: an earlier refused change is not refused again.
    private func syncGlobalParams(keys: [String]) throws(ProtocolError) {
        guard tracking.depth == 0, !evaluationRuns.isEmpty else { return }
        let globals = tracking.globalParams
        var firstError: ProtocolError?
        for handle in evaluationRuns.values {
            guard let entry = services.registry.entry(handle), entry.status == .running else { continue }
            var fresh = StringMap()
            for key in keys {
                guard let value = globals[key] else { continue }
                if let old = entry.params[key] {
                    if old != value, firstError == nil {
                        firstError = ProtocolError(.paramChanged, "Global param '\(key)' changed after the evaluation's parent run started (was '\(old.prefix(100))', now '\(value.prefix(100))'); MLflow params cannot change, so the run keeps the old value.", key: key)
                    }
                } else {
                    fresh[key] = value
                }
            }
            guard !fresh.isEmpty else { continue }
            _ = try? services.registry.update(handle) { e in for (k, v) in fresh { e.params[k] = v } }
            enqueue(handle, .log(LogBatch(params: fresh)), to: entry.destination)
        }
        if let firstError { throw firstError }
    }

    private func noteEnqueued(_ done: Uploader.Enqueued, to destination: String?, records: Bool = true) {
        if records { lastTickets[destination ?? ""] = done.ticket }
        lastLSNs[destination ?? ""] = done.lsn
        if done.overloaded { wantsPause = true }
    }

    /// Adds a record to the frame being handled (journaled and queued by `commit`).
    private func enqueue(_ handle: String, _ record: SinkRecord, to destination: String?, completion: Uploader.Completion? = nil) {
        pending.append((destination, handle, record, completion))
    }

    // MARK: Artifacts

    private func openArtifact(handle: String, path: String) throws(ProtocolError) -> JSONObject {
        let run = try ownedRun(handle)
        try MLflowRules.validateArtifactPath(path)
        let id = nextArtifactID
        nextArtifactID += 1
        let spoolPath = services.spoolDirectory + "/" + run.handle + "-" + DaemonServices.newRunID().prefix(12)
        let fd = open(spoolPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o666)  // the umask applies: it becomes a store file as it is (the spool directory is private)
        guard fd >= 0 else {
            throw ProtocolError(.internalError, "The daemon cannot create a spool file in \(services.spoolDirectory): \(String(cString: strerror(errno))).")
        }
        artifacts[id] = OpenArtifact(handle: run.handle, destination: run.destination, path: path, spoolPath: spoolPath, fd: fd, bytes: 0)
        dirty = true
        return ["artifact": .int(id)]
    }

    private func writeChunk(artifact id: Int64, data: [UInt8]) throws(ProtocolError) {
        if interruptedArtifacts.contains(id) { return }  // its close asks for it again
        guard var artifact = artifacts[id] else {
            throw ProtocolError(.unknownHandle, "Unknown artifact id \(id): open it with artifact_open first.")
        }
        var offset = 0
        while offset < data.count {
            let n = data.withUnsafeBytes { write(artifact.fd, $0.baseAddress! + offset, $0.count - offset) }
            if n < 0 {
                if errno == EINTR { continue }
                let reason = String(cString: strerror(errno))
                discard(id)
                throw ProtocolError(.internalError, "Writing artifact '\(artifact.path)' to the spool failed: \(reason). The artifact was discarded; free disk space and send it again.")
            }
            offset += n
        }
        artifact.bytes += data.count
        artifacts[id] = artifact
    }

    private func closeArtifact(_ id: Int64) throws(ProtocolError) -> JSONObject {
        if interruptedArtifacts.remove(id) != nil {
            dirty = true
            throw ProtocolError(.artifactInterrupted, "The daemon restarted while artifact \(id) was being sent, and its partial copy is gone: send it again from its first chunk (the client libraries do this by themselves).")
        }
        guard let artifact = artifacts.removeValue(forKey: id) else {
            throw ProtocolError(.unknownHandle, "Unknown artifact id \(id): open it with artifact_open first.")
        }
        // The journal will name this file: its bytes are on disk before the record is.
        guard fsync(artifact.fd) == 0 else {
            let reason = String(cString: strerror(errno))
            close(artifact.fd)
            unlink(artifact.spoolPath)
            throw ProtocolError(.internalError, "Saving artifact '\(artifact.path)' to the spool failed: \(reason). The artifact was discarded; free disk space and send it again.")
        }
        close(artifact.fd)
        dirty = true
        let report = reportLater
        enqueue(artifact.handle, .artifact(path: artifact.path, spoolPath: artifact.spoolPath), to: artifact.destination) { result in
            if case .failure(var error) = result {
                error.op = "artifact_close"
                report(error)
            }
        }
        return ["bytes": .int(Int64(artifact.bytes)), "path": .string(artifact.path)]
    }

    private func discard(_ id: Int64) {
        guard let artifact = artifacts.removeValue(forKey: id) else { return }
        close(artifact.fd)
        unlink(artifact.spoolPath)
    }

    // MARK: Lifecycle

    /// The connection is gone: the session waits, detached, for its client to resume it. Its
    /// runs are detached; returns the handles of those left running.
    public func connectionClosed() -> [String] {
        commit()
        services.statistics.disconnected(connectionID)
        reportLater = { _ in }
        services.registry.setReporter(nil, forConnection: number)
        return services.registry.detach(connection: number)
    }

    /// Nobody resumed the session within the grace period: half-sent artifacts are dropped (its
    /// end is journaled and its runs end FAILED by whoever expired it: `SessionTable`'s owner).
    public func expire() {
        for id in Array(artifacts.keys) { discard(id) }
    }
}
