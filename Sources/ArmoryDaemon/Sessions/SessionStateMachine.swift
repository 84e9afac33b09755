import ArmoryProtocol
import Logging

/// What a session asks its connection to do about one frame. Plain data: `SessionChannelHandler`
/// carries it out and feeds what it learns back as an event (`accept`, `runFound`, `spoolOpened`…).
public enum SessionAction: Sendable {
    /// Nothing (a fire-and-forget op succeeded, or a resent one was dropped).
    case none
    case reply(JSONObject)
    case error(ProtocolError)
    /// Answer with the error, then close the connection.
    case close(ProtocolError)
    /// Resolve the destination `hello` names, then call `accept` and answer with hello's reply.
    case handshake(Hello)
    /// Ask the session's destination directly (not queued per run) and answer with what it says.
    case askDestination(DestinationQuery)
    /// Look a run up in the session's destination, then call `runFound`.
    case findRun(runID: String)
    /// Wait until run `handle` exists in MLflow (or `timeoutMs` passed), then answer with its
    /// descriptor (`run_id` null while still pending).
    case awaitRun(handle: String, timeoutMs: Int64)
    /// Wait until the journals hold every record of the session on disk, then answer a flush.
    case awaitDurable(timeoutMs: Int64)
    /// Wait until every record of the session reached its destination, then answer a flush.
    case awaitUploaded(timeoutMs: Int64)
    /// Create the spool file of an artifact, then call `spoolOpened` (or `spoolFailed`).
    case openSpool(artifact: Int64, path: String)
    /// Append a chunk to an artifact's spool file (`spoolFailed` when that fails).
    case writeSpool(artifact: Int64, bytes: [UInt8])
    /// Put an artifact's spool file on disk and close it, then call `spoolClosed` (or `spoolFailed`).
    case closeSpool(artifact: Int64)
    /// Answer from the daemon's own state (status, sync jobs, dead letters); `answered` keeps
    /// the reply of one whose effects cannot be asked for again.
    case query(DaemonQuery)
}

/// A question a session puts to its destination outside the run queues.
public enum DestinationQuery: Sendable, Equatable {
    case experiment(name: String, create: Bool)
    case setExperimentTag(experimentID: String, key: String, value: String)
}

/// A request answered from the daemon's state rather than the session's.
public enum DaemonQuery: Sendable {
    case status
    case sync(SyncRequest)
    case syncStatus
    case deadLetters(runID: String?, retry: Bool)
}

/// A record a frame produced, with the destination it goes to.
public struct SessionRecordOut: Sendable {
    public var destination: DestinationKey
    public var handle: String
    public var record: SinkRecord
}

/// What `commit` hands to the uploaders: the records in order, and the journal-only entry (the
/// session's record or its mark) that goes with them into `home`'s journal.
public struct SessionCommit: Sendable {
    public var records: [SessionRecordOut]
    public var tail: JournalEntry?
    public var home: DestinationKey
}

/// One client session's protocol logic as a value: the handshake, the `seq` numbering across
/// reconnects, its tracking state, its evaluations and chains, validation, and the records each
/// frame produces. Frames and events go in; `SessionAction`s and `SessionCommit`s come out. It
/// does no I/O: the shared `RunRegistry` is the only thing outside it that it reads and updates
/// (run ownership, params, status), in memory (docs/architecture.md, "Sessions outlive connections").
///
/// Its durable part is `record`, journaled with the frame's records by `commit`; restoring a
/// session after a restart is `init(restoring:)` from the latest one.
public struct SessionStateMachine: Sendable {
    /// The session's id (128 random bits as hex), what `resume` names.
    public let id: String
    /// Owner token of the session's runs in the registry (`RunEntry.connection`).
    public let number: UInt64
    public private(set) var peer: PeerCredentials
    private let runs: RunRegistry
    private let userName: String
    private let spoolDirectory: String

    public private(set) var hello: Hello?
    public private(set) var tracking = TrackingState()
    /// Where this session's new runs go.
    public private(set) var destination = DestinationKey.primary
    /// The destination names run ids itself (a local store): the daemon assigns them.
    private var assignsRunIDs = false
    /// The highest `seq` handled so far (what an ack may cover).
    public private(set) var handledSeq: UInt64 = 0
    private var evaluationRuns: [Int64: String] = [:]
    private var chainRuns: [Int64: String] = [:]
    /// Runs written through MLflow's API (`create_run`, `attach`).
    private var otherRuns: [String] = []
    /// Replies of requests with effects, by `seq` (the latest `replyCacheSize`).
    private var replies: [UInt64: SessionRecord.CachedReply] = [:]
    /// Artifacts being received, by id.
    private var artifacts: [Int64: OpenArtifact] = [:]
    /// Artifacts that were open when the daemon stopped: their chunks are dropped, their close
    /// asks the client to send them again.
    private var interruptedArtifacts = Set<Int64>()
    private var nextArtifactID: Int64 = 1
    /// The session's state changed since its last journal record.
    private var dirty = false
    /// A record of the session is in the journal (its end is then journaled too).
    public private(set) var journaled = false
    /// The session ends when this connection closes, with no wait for a resume: the client said
    /// `bye` (a resume, the connection broke after all, clears it), or it is an admin tool, which
    /// never resumes.
    public private(set) var endsWithConnection = false
    /// Records not yet committed: the frame's being handled, or a read burst's metric-only frames.
    private var pending: [SessionRecordOut] = []
    /// The run of the previous `log` frame (already known to be one of the session's).
    private var lastLoggedRun = ""
    /// Metric keys already found valid in this session (most runs log a handful of keys).
    private var validMetricKeys = Set<String>()
    /// Runs whose client logs `system/...` metrics itself (the daemon no longer samples them).
    private var clientSampledRuns = Set<String>()
    /// Metrics accepted since `takeAcceptedMetrics` (one statistics update per read burst).
    private var acceptedMetrics: UInt64 = 0

    /// An artifact being received: where it goes and its spool file.
    private struct OpenArtifact: Sendable {
        var handle: String
        var destination: DestinationKey
        var path: String
        var spoolPath: String
        var bytes: Int
    }

    /// How many replies a session keeps for re-sent requests.
    static let replyCacheSize = 256
    /// How long `start` waits for the server to create the run before answering with a pending id.
    static let startWaitMs: Int64 = 2000
    /// How long MLflow's `create_run` waits for the server's id.
    static let createRunWaitMs: Int64 = 10_000

    /// A new session of `peer`.
    public init(id: String = Self.newSessionID(), number: UInt64, peer: PeerCredentials, runs: RunRegistry, userName: String, spoolDirectory: String) {
        self.id = id
        self.number = number
        self.peer = peer
        self.runs = runs
        self.userName = userName
        self.spoolDirectory = spoolDirectory
    }

    /// A session restored from its journal record after a restart, detached until a client resumes it.
    public init(restoring record: SessionRecord, number: UInt64, runs: RunRegistry, userName: String, spoolDirectory: String) {
        self.init(
            id: record.id, number: number, peer: PeerCredentials(uid: record.uid, gid: record.gid, pid: record.pid),
            runs: runs, userName: userName, spoolDirectory: spoolDirectory)
        tracking = record.tracking
        handledSeq = record.seq
        evaluationRuns = record.evaluationRuns
        chainRuns = record.chainRuns
        otherRuns = record.otherRuns
        replies = record.replies
        interruptedArtifacts = Set(record.openArtifacts)
        nextArtifactID = record.nextArtifactID
        journaled = true
    }

    /// 128 random bits as 32 lowercase hex digits.
    public static func newSessionID() -> String {
        var generator = SystemRandomNumberGenerator()
        let a = String(generator.next() as UInt64, radix: 16)
        let b = String(generator.next() as UInt64, radix: 16)
        return String(repeating: "0", count: 16 - a.count) + a + String(repeating: "0", count: 16 - b.count) + b
    }

    /// What the journal keeps of the session.
    public var record: SessionRecord {
        SessionRecord(
            id: id, uid: peer.uid, gid: peer.gid, pid: peer.pid, client: hello?.client ?? "", program: hello?.program ?? "",
            systemMetrics: hello?.systemMetrics ?? true, seq: handledSeq, tracking: tracking, evaluationRuns: evaluationRuns,
            chainRuns: chainRuns, otherRuns: otherRuns, replies: replies, openArtifacts: Array(artifacts.keys) + interruptedArtifacts,
            nextArtifactID: nextArtifactID)
    }

    /// Whether the session holds nothing worth restoring (a status query, say).
    private var isTrivial: Bool {
        tracking == TrackingState() && evaluationRuns.isEmpty && chainRuns.isEmpty && otherRuns.isEmpty && replies.isEmpty && artifacts.isEmpty
    }

    /// Metrics accepted since the last call.
    public mutating func takeAcceptedMetrics() -> UInt64 {
        defer { acceptedMetrics = 0 }
        return acceptedMetrics
    }

    /// Whether `frame` only logs metrics: its records wait for the end of the read burst (one
    /// pass through the uploader's and the journal's locks instead of one per frame), where
    /// every other frame commits before and after it.
    public static func waitsForBurst(_ frame: ClientFrame) -> Bool {
        if case .log(_, let batch) = frame.op { return batch.params.isEmpty && batch.tags.isEmpty }
        return false
    }

    // MARK: Frames

    /// Handles one decoded frame.
    public mutating func receive(_ frame: ClientFrame, nowMs: Int64) -> SessionAction {
        let isHello: Bool
        if case .hello(let h) = frame.op {
            // After a resume, a plain `hello` is the client's first one, resent among the frames
            // it kept (a session started again under its id holds none of them): already done.
            if h.resume == nil, hello?.resume != nil { return .none }
            isHello = true
        } else {
            isHello = false
        }
        if !isHello, frame.seq <= handledSeq {
            return duplicate(frame, nowMs: nowMs)
        }
        // `hello` stays outside the session's numbering: a resuming client's hello comes before
        // the frames it resends.
        if !isHello { handledSeq = frame.seq }
        let action: SessionAction
        do {
            action = try dispatch(frame.op, nowMs: nowMs)
        } catch {
            action = .error(error)
        }
        return answered(frame, action)
    }

    /// A frame that could not be read (broken JSON, a missing member, too large): its error names
    /// the `seq` read from it, else the next one the session expects, and the frame counts as
    /// answered. `nil`: a resent copy of a fire-and-forget frame already answered (dropped).
    public mutating func refuseUnreadable(_ error: ProtocolError) -> ProtocolError? {
        var error = error
        guard error.op != "hello" else { return error }  // outside the numbering
        if let seq = error.seq, seq <= handledSeq {
            return ClientOp.requestNames.contains(error.op ?? "") ? error : nil
        }
        let seq = error.seq ?? handledSeq + 1
        error.seq = seq
        handledSeq = seq
        return error
    }

    /// The answer to `frame`: an error names the frame, and the answer to a request whose effects
    /// cannot be asked for again is kept for a client that resends it.
    public mutating func answered(_ frame: ClientFrame, _ action: SessionAction) -> SessionAction {
        var action = action
        switch action {
        case .error(let error): action = .error(error.answering(frame))
        case .close(let error): action = .close(error.answering(frame))
        default: break
        }
        guard Self.isRemembered(frame.op) else { return action }
        switch action {
        case .reply(let body): remember(.reply(body), seq: frame.seq)
        case .awaitRun(let handle, _): remember(.run(handle: handle), seq: frame.seq)
        case .error(let error): remember(.error(error), seq: frame.seq)
        default: break
        }
        return action
    }

    private static func isRemembered(_ op: ClientOp) -> Bool {
        switch op {
        case .start, .createRun, .artifactOpen, .artifactClose, .sync: true
        default: false
        }
    }

    private mutating func remember(_ reply: SessionRecord.CachedReply, seq: UInt64) {
        replies[seq] = reply
        if replies.count > Self.replyCacheSize, let oldest = replies.keys.min() { replies[oldest] = nil }
        dirty = true
    }

    /// A frame this session already holds (a client resending after a reconnect): dropped, and a
    /// request answered as it was the first time.
    private mutating func duplicate(_ frame: ClientFrame, nowMs: Int64) -> SessionAction {
        guard frame.op.expectsReply else { return .none }
        switch replies[frame.seq] {
        case .reply(let body)?:
            return .reply(body)
        case .run(let handle)?:
            return .awaitRun(handle: handle, timeoutMs: Self.startWaitMs)
        case .error(var error)?:
            error.seq = frame.seq
            error.op = frame.op.name
            return .error(error)
        case nil:
            break
        }
        if Self.isRemembered(frame.op) {
            return .error(
                ProtocolError(
                    .invalidState, "Request seq \(frame.seq) ('\(frame.op.name)') was handled already and its reply is no longer kept (the daemon keeps the last \(Self.replyCacheSize)); the client resent it too late. Check the run with run_info.",
                    seq: frame.seq, op: frame.op.name))
        }
        // Queries, flushes, `end` and `attach` give the same answer when asked again.
        do {
            return try dispatch(frame.op, nowMs: nowMs)
        } catch {
            return .error(error.answering(frame))
        }
    }

    /// Hands the pending records to the uploaders, together with the session's record (when its
    /// state changed) or its mark (its `seq`), so that a restart restores the session exactly as
    /// far as its records go. A client's session is journaled from its handshake on, even while
    /// it holds nothing yet: its client may resume it after a restart that comes during its first
    /// queries. An admin tool's session is journaled only once it holds something. `nil`: nothing
    /// to journal.
    public mutating func commit() -> SessionCommit? {
        let writeRecord = dirty && (journaled || !pending.isEmpty || !isTrivial || hello?.admin == false)
        guard !pending.isEmpty || writeRecord else { return nil }
        if writeRecord {
            dirty = false
            journaled = true
        }
        let tail: JournalEntry? = writeRecord ? .session(record) : journaled ? .sessionMark(id: id, seq: handledSeq) : nil
        // Handed over whole: an emptied array that kept its capacity would be a copy of the
        // burst's size (the commit still shares the buffer), held by every idle session.
        let records = pending
        pending = []
        return SessionCommit(records: records, tail: tail, home: destination)
    }

    private mutating func dispatch(_ op: ClientOp, nowMs: Int64) throws(ProtocolError) -> SessionAction {
        if case .hello(let h) = op { return handshake(h) }
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
            return .askDestination(.experiment(name: name, create: create))
        case .setExperimentTag(let experimentID, let key, let value):
            try MLflowRules.validateKey(key, kind: .tag)
            try MLflowRules.validateTagValue(value, key: key, limit: MLflowRules.maxExperimentTagValueLength)
            return .askDestination(.setExperimentTag(experimentID: experimentID, key: key, value: value))
        case .deleteTag(let handle, let key):
            try MLflowRules.validateKey(key, kind: .tag)
            let run = try ownedRun(handle)
            enqueue(run.handle, .deleteTag(key: key), to: run.destination)
        case .createRun(let experimentID, let runName, let startTime, let tags):
            return try createStandaloneRun(experimentID: experimentID, runName: runName, startTime: startTime ?? nowMs, tags: tags)
        case .attach(let runID):
            return try attach(runID: runID)
        case .runInfo(let handle, let waitMs):
            let run = try ownedRun(handle)
            if run.runID == nil, run.failure == nil, waitMs > 0 { return .awaitRun(handle: handle, timeoutMs: waitMs) }
            if let failure = run.failure { throw failure }
            return .reply(run.descriptor.json)
        case .log(let handle, let batch):
            try log(handle: handle, batch: batch)
        case .artifactOpen(let handle, let path):
            return try openArtifact(handle: handle, path: path)
        case .artifactChunk(let id, let data):
            if interruptedArtifacts.contains(id) { return .none }  // its close asks for it again
            guard artifacts[id] != nil else {
                throw ProtocolError(.unknownHandle, "Unknown artifact id \(id): open it with artifact_open first.")
            }
            artifacts[id]!.bytes += data.count
            return .writeSpool(artifact: id, bytes: data)
        case .artifactClose(let id):
            if interruptedArtifacts.remove(id) != nil {
                dirty = true
                throw ProtocolError(.artifactInterrupted, "The daemon restarted while artifact \(id) was being sent, and its partial copy is gone: send it again from its first chunk (the client libraries do this by themselves).")
            }
            guard artifacts[id] != nil else {
                throw ProtocolError(.unknownHandle, "Unknown artifact id \(id): open it with artifact_open first.")
            }
            return .closeSpool(artifact: id)
        case .flush(let level, let timeoutMs):
            return level == .durable ? .awaitDurable(timeoutMs: max(0, timeoutMs)) : .awaitUploaded(timeoutMs: max(0, timeoutMs))
        case .status:
            return .query(.status)
        case .sync(let request):
            return .query(.sync(request))
        case .syncStatus:
            return .query(.syncStatus)
        case .deadLetters(let runID, let retry):
            return .query(.deadLetters(runID: runID, retry: retry))
        case .bye:
            endsWithConnection = true
        }
        return .none
    }

    // MARK: Handshake

    private func handshake(_ h: Hello) -> SessionAction {
        guard hello == nil else {
            return .error(ProtocolError(.invalidState, "\"hello\" was already sent on this connection."))
        }
        if let unsupported = Self.unsupported(h) { return .close(unsupported) }
        return .handshake(h)
    }

    /// The error for a `hello` of a protocol version this daemon does not speak.
    public static func unsupported(_ h: Hello) -> ProtocolError? {
        guard !ProtocolVersion.supported.contains(h.protocolVersion) else { return nil }
        return ProtocolError(
            .unsupportedProtocol,
            "Protocol \(h.protocolVersion) is not supported: this armoryd \(DaemonVersion.current) speaks \(ProtocolVersion.supported.lowerBound)...\(ProtocolVersion.supported.upperBound). Upgrade the client library or the daemon so that they share a version."
        )
    }

    /// The handshake went through (its destination resolved): the session is open, or continues
    /// on a new connection when `peer` comes from a resume.
    public mutating func accept(_ h: Hello, destination: DestinationKey, assignsRunIDs: Bool, peer: PeerCredentials) {
        hello = h
        self.destination = destination
        self.assignsRunIDs = assignsRunIDs
        self.peer = peer
        endsWithConnection = h.admin
        dirty = true
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

    /// Registers a run and queues its creation and its initial params; the registry learns its
    /// MLflow ids when the sink has created it.
    private mutating func createRun(name: String, experiment: String, experimentID: String? = nil, parent: RunEntry?, tags extraTags: StringMap, params: StringMap, nowMs: Int64) -> RunEntry {
        let handle = RunIDs.newHandle()
        let runID = assignsRunIDs ? RunIDs.newRunID() : nil
        var tags = experimentID == nil ? baseTags(runName: name, handle: handle) : ["armory.handle": handle]
        for (k, v) in extraTags { tags[k] = v }
        var entry = RunEntry(
            handle: handle, runID: runID, experimentID: nil, experimentName: experiment, name: name,
            ownerUID: peer.uid, status: .running, parentHandle: parent?.handle, params: params,
            connection: number, clientPID: peer.pid)
        entry.destination = destination
        // An evaluation's runs are sampled by default; a run of MLflow's API as MLflow samples it:
        // by MLflow's own monitor, when the code asks for it (the daemon then stays out of it).
        entry.systemMetrics = (hello?.systemMetrics ?? true) && (Self.systemMetricsWanted(tags) ?? (experimentID == nil))
        runs.insert(entry)
        var creation = RunCreation(
            handle: handle, runID: runID, experimentName: experiment, name: name, userID: userName,
            startTime: nowMs, tags: tags, parentHandle: parent?.handle)
        creation.experimentID = experimentID
        creation.ownerUID = peer.uid
        creation.clientPID = peer.pid
        enqueue(handle, .createRun(creation), to: destination)
        if !params.isEmpty { enqueue(handle, .log(LogBatch(params: params)), to: destination) }
        dirty = true
        return entry
    }

    /// The tag `armory.system_metrics` (`off`/`false`/`0` turn the daemon's system metrics off).
    static func systemMetricsWanted(_ tags: StringMap) -> Bool? {
        tags["armory.system_metrics"].map { !["off", "false", "0", "no"].contains($0.lowercased()) }
    }

    /// MLflow's `create_run` (clients speaking MLflow's API): the run is created at once, and the
    /// reply waits (bounded) for MLflow's id, which MLflow code needs before it goes on.
    private mutating func createStandaloneRun(experimentID: String, runName: String?, startTime: Int64, tags: StringMap) throws(ProtocolError) -> SessionAction {
        for (key, value) in tags {
            try MLflowRules.validateKey(key, kind: .tag)
            try MLflowRules.validateTagValue(value, key: key)
        }
        let name = runName ?? tags["mlflow.runName"] ?? ""
        let parent = tags["mlflow.parentRunId"].flatMap { runs.entry(runID: $0) }
        var extra = tags
        if parent != nil { extra.removeValue(forKey: "mlflow.parentRunId") }  // the uploader adds the bound id
        let entry = createRun(name: name, experiment: "", experimentID: experimentID, parent: parent, tags: extra, params: [:], nowMs: startTime)
        otherRuns.append(entry.handle)
        return .awaitRun(handle: entry.handle, timeoutMs: Self.createRunWaitMs)
    }

    /// Starts the evaluation's parent run if it is not running yet; returns its handle and
    /// whether it was created now.
    private mutating func ensureParent(evaluation id: Int64, nowMs: Int64) throws(ProtocolError) -> (handle: String, created: Bool) {
        if let handle = evaluationRuns[id] { return (handle, false) }
        guard let config = tracking.evaluations[id] else {
            throw ProtocolError(.unknownHandle, "No evaluation with id \(id) on this connection: send \"evaluation\" first.")
        }
        var tags = StringMap()
        if let description = config.description, !description.isEmpty { tags["mlflow.note.content"] = description }
        let entry = createRun(name: config.name, experiment: config.name, parent: nil, tags: tags, params: tracking.globalParams, nowMs: nowMs)
        evaluationRuns[id] = entry.handle
        return (entry.handle, true)
    }

    /// Answers with the run's descriptor once the sink has created it (bounded: a start never
    /// waits long on an unreachable server; `run_info` with `wait_ms` asks again later).
    private mutating func start(_ target: RunTarget, nowMs: Int64) throws(ProtocolError) -> SessionAction {
        switch target {
        case .evaluation(let id):
            let (handle, created) = try ensureParent(evaluation: id, nowMs: nowMs)
            return created ? .awaitRun(handle: handle, timeoutMs: Self.startWaitMs) : .reply(runs.entry(handle)?.descriptor.json ?? [:])
        case .chain(let id):
            guard let chain = tracking.chains[id] else {
                throw ProtocolError(.unknownHandle, "No chain with id \(id) on this connection: send \"chain\" first.")
            }
            if let existing = chainRuns[id] {
                guard let entry = runs.entry(existing), entry.status == .running else {
                    throw ProtocolError(.invalidState, "Chain '\(chain.name)' has already run and ended; add a new chain to run it again.")
                }
                return .reply(entry.descriptor.json)
            }
            let parent = runs.entry(try ensureParent(evaluation: chain.evaluation, nowMs: nowMs).handle)
            let params = try tracking.chainParams(id: id)
            let entry = createRun(name: chain.name, experiment: parent?.experimentName ?? "", parent: parent, tags: [:], params: params, nowMs: nowMs)
            chainRuns[id] = entry.handle
            return .awaitRun(handle: entry.handle, timeoutMs: Self.startWaitMs)
        case .run:
            throw ProtocolError(.invalidValue, "\"start\" takes an evaluation or a chain; to continue an existing run use \"attach\".")
        }
    }

    private mutating func end(_ target: RunTarget, status: RunStatus, nowMs: Int64) throws(ProtocolError) -> JSONObject {
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
            let ended: RunEntry? =
                try runs.update(handle) { entry in
                    guard entry.status == .running else { return nil }
                    entry.status = status
                    entry.endTime = nowMs
                    return entry
                } ?? nil
            if let ended { enqueue(handle, .updateRun(status: status, endTime: nowMs), to: ended.destination) }
            last = runs.entry(handle)
        }
        return last?.descriptor.json ?? [:]
    }

    /// MLflow's `start_run(run_id=…)`: the run becomes RUNNING again and this session writes it.
    /// A run the daemon does not know is looked up in the destination first (`runFound`).
    private mutating func attach(runID: String) throws(ProtocolError) -> SessionAction {
        guard let entry = runs.entry(runID: runID) else { return .findRun(runID: runID) }
        try checkOwner(entry)
        return .reply(reattach(entry))
    }

    /// What the destination holds of a run `attach` named: the run is registered (the first
    /// registration wins when another session attached it meanwhile) and attached, or the
    /// answer says why not. `bind`: the run the uploader must know before its records.
    public mutating func runFound(_ stored: StoredRun?, runID: String, in destinationName: String, for frame: ClientFrame) -> (bind: RunEntry?, action: SessionAction) {
        guard let stored else {
            return (nil, answered(frame, .error(ProtocolError(.notFound, "No run with id '\(runID)' in \(destinationName): check the id (armoryctl status lists active runs)."))))
        }
        guard peer.uid == 0 || stored.userID == userName else {
            return (nil, answered(frame, .error(ProtocolError(.permissionDenied, "Permission denied: run \(runID) belongs to user '\(stored.userID)'; only that user or root can write to it."))))
        }
        if let registered = runs.entry(runID: runID) { return (nil, answered(frame, .reply(reattach(registered)))) }
        var entry = RunEntry(
            handle: stored.tags["armory.handle"] ?? RunIDs.newHandle(), runID: stored.runID, experimentID: stored.experimentID,
            experimentName: "", name: stored.name, ownerUID: peer.uid, status: stored.status,
            parentHandle: nil, params: stored.params, connection: number, clientPID: peer.pid)
        entry.endTime = stored.endTime
        entry.destination = destination
        runs.insert(entry)
        return (entry, answered(frame, .reply(reattach(entry))))
    }

    /// Marks a run RUNNING again (keeping its previous end time, as MLflow does) and this session's.
    private mutating func reattach(_ entry: RunEntry) -> JSONObject {
        if !otherRuns.contains(entry.handle) {
            otherRuns.append(entry.handle)
            dirty = true
        }
        let number = number
        let updated =
            (try? runs.update(entry.handle) { e in
                e.connection = number
                e.status = .running
                return e
            }) ?? nil
        if entry.status != .running { enqueue(entry.handle, .updateRun(status: .running, endTime: entry.endTime), to: entry.destination) }
        return (updated ?? entry).descriptor.json
    }

    private func checkOwner(_ entry: RunEntry) throws(ProtocolError) {
        guard peer.uid == 0 || entry.ownerUID == peer.uid else {
            throw ProtocolError(.permissionDenied, "Permission denied: run \(entry.runID ?? entry.handle) belongs to uid \(entry.ownerUID); only that user or root can write to it.")
        }
    }

    private func ownedRun(_ handle: String) throws(ProtocolError) -> RunEntry {
        guard let entry = runs.entry(handle) else {
            throw ProtocolError(.unknownHandle, "Unknown run handle '\(handle)': use the handle returned by start or attach.")
        }
        try checkOwner(entry)
        return entry
    }

    /// Validates a batch, keeps what is valid, and reports the first problem (naming the key).
    private mutating func log(handle: String, batch: LogBatch) throws(ProtocolError) {
        let run = try ownedRun(handle)
        let isChain = chainRuns.values.contains(handle)
        if run.status != .running, isChain || evaluationRuns.values.contains(handle) {
            // An Armory evaluation or chain is over once ended (MLflow's API, `otherRuns`, may
            // still log to a finished run, as MLflow itself allows).
            throw ProtocolError(
                .invalidState, "\(isChain ? "Chain" : "Evaluation") run '\(run.name)' already ended (\(run.status.rawValue)): nothing more is logged to it. Log before ending it, or start a new chain.",
                key: batch.metrics.first?.key ?? batch.params.keys.first ?? batch.tags.keys.first)
        }
        if handle != lastLoggedRun {
            // A run of this uid that another session started becomes this session's too.
            if !isChain && !evaluationRuns.values.contains(handle) && !otherRuns.contains(handle) {
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
                _ = try? runs.update(handle) { $0.systemMetrics = false }
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
            _ = try? runs.update(handle) { $0.systemMetrics = wanted }
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
        if !batch.params.isEmpty, let (accepted, errors) = (try? runs.update(handle) { entry in Self.acceptParams(batch.params, into: &entry) }) ?? nil {
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

    /// Adds the valid params the run does not have yet; a changed one is refused (MLflow params
    /// cannot change). Checked and added under the registry's lock: two sessions writing one run
    /// cannot both add a key.
    private static func acceptParams(_ params: StringMap, into entry: inout RunEntry) -> (StringMap, [ProtocolError]) {
        var accepted = StringMap()
        var errors: [ProtocolError] = []
        for (key, value) in params {
            do throws(ProtocolError) {
                try MLflowRules.validateKey(key, kind: .param)
                try MLflowRules.validateParamValue(value, key: key)
            } catch {
                errors.append(error)
                continue
            }
            if let old = entry.params[key] {
                if old != value {
                    errors.append(
                        ProtocolError(
                            .paramChanged, "Param '\(key)' of run \(entry.runID ?? entry.handle) was already logged as '\(old.prefix(100))'; MLflow params cannot change (new value '\(value.prefix(100))'). Use a new key, a tag, or a new run.",
                            key: key))
                }
                continue
            }
            entry.params[key] = value
            accepted[key] = value
        }
        return (accepted, errors)
    }

    /// Global params set after the parent run started still go to it (MLflow params are immutable).
    /// Only `keys`, the ones the frame set, are checked: an earlier refused change is not refused again.
    private mutating func syncGlobalParams(keys: [String]) throws(ProtocolError) {
        guard tracking.depth == 0, !evaluationRuns.isEmpty else { return }
        let globals = tracking.globalParams
        var firstError: ProtocolError?
        for handle in evaluationRuns.values {
            guard let entry = runs.entry(handle), entry.status == .running else { continue }
            var fresh = StringMap()
            for key in keys {
                guard let value = globals[key] else { continue }
                if let old = entry.params[key] {
                    if old != value, firstError == nil {
                        firstError = ProtocolError(
                            .paramChanged, "Global param '\(key)' changed after the evaluation's parent run started (was '\(old.prefix(100))', now '\(value.prefix(100))'); MLflow params cannot change, so the run keeps the old value.", key: key)
                    }
                } else {
                    fresh[key] = value
                }
            }
            guard !fresh.isEmpty else { continue }
            _ = try? runs.update(handle) { e in for (k, v) in fresh { e.params[k] = v } }
            enqueue(handle, .log(LogBatch(params: fresh)), to: entry.destination)
        }
        if let firstError { throw firstError }
    }

    /// Adds a record to the frame being handled (journaled and queued by `commit`).
    private mutating func enqueue(_ handle: String, _ record: SinkRecord, to destination: DestinationKey) {
        pending.append(SessionRecordOut(destination: destination, handle: handle, record: record))
    }

    // MARK: Artifacts

    private mutating func openArtifact(handle: String, path: String) throws(ProtocolError) -> SessionAction {
        let run = try ownedRun(handle)
        try MLflowRules.validateArtifactPath(path)
        let id = nextArtifactID
        nextArtifactID += 1
        let spoolPath = spoolDirectory + "/" + run.handle + "-" + RunIDs.newRunID().prefix(12)
        artifacts[id] = OpenArtifact(handle: run.handle, destination: run.destination, path: path, spoolPath: spoolPath, bytes: 0)
        dirty = true
        return .openSpool(artifact: id, path: spoolPath)
    }

    /// The artifact's spool file exists: the client may send its chunks.
    public mutating func spoolOpened(artifact id: Int64, for frame: ClientFrame) -> SessionAction {
        answered(frame, .reply(["artifact": .int(id)]))
    }

    /// The artifact's bytes are on disk: its record is queued (the journal names the file).
    public mutating func spoolClosed(artifact id: Int64, for frame: ClientFrame) -> SessionAction {
        guard let artifact = artifacts.removeValue(forKey: id) else { return .none }
        dirty = true
        enqueue(artifact.handle, .artifact(path: artifact.path, spoolPath: artifact.spoolPath), to: artifact.destination)
        return answered(frame, .reply(["bytes": .int(Int64(artifact.bytes)), "path": .string(artifact.path)]))
    }

    /// The spool file could not be created, written or saved (`reason`): the artifact is
    /// discarded and the client told to send it again.
    public mutating func spoolFailed(artifact id: Int64, reason: String, for frame: ClientFrame) -> SessionAction {
        let path = artifacts.removeValue(forKey: id)?.path ?? "\(id)"
        dirty = true
        let error: ProtocolError
        if case .artifactOpen = frame.op {
            error = ProtocolError(.internalError, "The daemon cannot create a spool file in \(spoolDirectory): \(reason).")
        } else {
            error = ProtocolError(.internalError, "Saving artifact '\(path)' to the spool failed: \(reason). The artifact was discarded; free disk space and send it again.")
        }
        return answered(frame, .error(error))
    }
}
