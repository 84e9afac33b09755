import ArmoryProtocol
import Logging
import MLflow

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A live session: its `SessionStateMachine` and what carrying out its actions needs to keep
/// across connections (the uploader tickets and journal positions of its records, its open
/// spool files). `SessionTable` holds it while no connection does; one event loop at a time
/// uses it (the connection it is attached to).
public final class Session: @unchecked Sendable {
    public private(set) var machine: SessionStateMachine
    /// The connection carrying the session now (statistics, logs).
    public private(set) var connectionID: UInt64
    private let services: DaemonServices
    /// Restored after a restart: its records before it were replayed into the uploaders, and its
    /// first resume makes `flush wait=uploaded` wait for them too.
    private var awaitsReplayedRecords = false
    /// The last uploader ticket of a record this session produced, per destination (what
    /// `flush wait=uploaded` and a run's creation wait for).
    private var lastTickets: [DestinationKey: UInt64] = [:]
    /// The runs this session wrote to, per destination (what `flush wait=uploaded` waits for:
    /// their records only, not other sessions' backlog).
    private var runsWritten: [DestinationKey: Set<String>] = [:]
    /// The last journal sequence number of a record this session produced, per destination
    /// (what an ack waits for).
    private var lastLSNs: [DestinationKey: UInt64] = [:]
    /// Open spool files, by artifact id.
    private var spoolFiles: [Int64: (fd: Int32, path: String)] = [:]
    /// Set when an uploader passed its high-water mark: the connection should stop reading.
    public private(set) var wantsPause = false

    public var id: String { machine.id }
    public var peer: PeerCredentials { machine.peer }
    public var journaled: Bool { machine.journaled }
    public var record: SessionRecord { machine.record }
    public var handledSeq: UInt64 { machine.handledSeq }

    /// A new session of the client `peer` on connection `connectionID` (named `id`, else a fresh
    /// id); `report` sends the errors of its fire-and-forget ops there later.
    public init(
        id: String = SessionStateMachine.newSessionID(), connectionID: UInt64, peer: PeerCredentials, services: DaemonServices,
        report: @escaping @Sendable (ProtocolError) -> Void
    ) {
        self.connectionID = connectionID
        self.services = services
        machine = SessionStateMachine(
            id: id, number: services.sessions.nextNumber(), peer: peer, runs: services.registry,
            userName: DaemonServices.userName(uid: peer.uid), spoolDirectory: services.spoolDirectory)
        services.registry.setReporter(report, forConnection: machine.number)
    }

    /// A session restored from its journal record after a restart, detached until a client resumes it.
    public init(restoring record: SessionRecord, services: DaemonServices) {
        connectionID = 0
        self.services = services
        machine = SessionStateMachine(
            restoring: record, number: services.sessions.nextNumber(), runs: services.registry,
            userName: DaemonServices.userName(uid: record.uid), spoolDirectory: services.spoolDirectory)
        awaitsReplayedRecords = true
    }

    /// Handles one frame: the records of a frame that is not metric-only are committed before
    /// and after it, a read burst's metric records by the handler at the end of the burst.
    public func receive(_ frame: ClientFrame, nowMs: Int64) -> SessionAction {
        let burst = SessionStateMachine.waitsForBurst(frame)
        if !burst { commit() }
        let action = machine.receive(frame, nowMs: nowMs)
        if !burst { commit() }
        return action
    }

    /// Feeds an event to the state machine and commits the records it produced.
    public func event<T>(_ body: (inout SessionStateMachine) -> T) -> T {
        let result = body(&machine)
        commit()
        return result
    }

    /// Journals and queues the state machine's pending records (see `SessionStateMachine.commit`).
    public func commit() {
        guard let commit = machine.commit() else { return }
        var start = 0
        var tailWritten = commit.tail == nil
        let records = commit.records
        while start < records.count {
            let destination = records[start].destination
            var end = start + 1
            while end < records.count && records[end].destination == destination { end += 1 }
            let isHome = destination == commit.home && !tailWritten
            let batch = records[start..<end].map { ($0.handle, $0.record, completion(for: $0)) }
            var lastHandle: String?
            for out in records[start..<end] where out.handle != lastHandle {
                runsWritten[destination, default: []].insert(out.handle)
                lastHandle = out.handle
            }
            noteEnqueued(services.destinations.uploader(destination).enqueue(batch, tail: isHome ? commit.tail : nil, uid: peer.uid), to: destination)
            if isHome { tailWritten = true }
            start = end
        }
        if !tailWritten, let tail = commit.tail {
            noteEnqueued(services.destinations.uploader(commit.home).enqueue([], tail: tail), to: commit.home, records: false)
        }
    }

    /// Keeps what the session waits for; past the backlog bound, a session that produced records
    /// stops reading. The session's own record alone never pauses it: a client whose session only
    /// asks questions (`status` while the journal is full) is answered.
    private func noteEnqueued(_ done: Uploader.Enqueued, to destination: DestinationKey, records: Bool = true) {
        if records { lastTickets[destination] = done.ticket }
        lastLSNs[destination] = done.lsn
        if done.overloaded && records { wantsPause = true }
    }

    /// What happens when the sink has acted on a record: a created run's ids go to the registry,
    /// and a refusal to the session writing the run (fire-and-forget ops learn of it late).
    /// Logs the runs' lifecycle.
    private func completion(for out: SessionRecordOut) -> RecordCompletion? {
        let registry = services.registry
        let handle = out.handle
        switch out.record {
        case .createRun(let creation):
            if let entry = registry.entry(handle) { services.logger.info("run started", metadata: Self.metadata(entry)) }
            return { result in
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
                    registry.report(ProtocolError(error.code, "Run '\(creation.name)' could not be created: \(error.message)", op: "start"), toWriterOf: handle)
                }
            }
        case .updateRun(let status, _):
            if status != .running, let entry = registry.entry(handle) {
                var metadata = Self.metadata(entry)
                metadata["status"] = "\(status.rawValue)"
                services.logger.info("run ended", metadata: metadata)
            }
            return nil
        case .deleteTag:
            return Self.reportFailure(of: "delete_tag", handle: handle, registry: registry)
        case .artifact:
            return Self.reportFailure(of: "artifact_close", handle: handle, registry: registry)
        default:
            return nil
        }
    }

    private static func reportFailure(of op: String, handle: String, registry: RunRegistry) -> RecordCompletion {
        { result in
            if case .failure(var error) = result {
                error.op = op
                registry.report(error, toWriterOf: handle)
            }
        }
    }

    /// What the log says about a run: journald fields `RUN_ID`, `EVALUATION`, `RUN`, `CLIENT_PID`, `UID`.
    private static func metadata(_ entry: RunEntry) -> Logger.Metadata {
        [
            "run_id": "\(entry.runID ?? "pending")", "handle": "\(entry.handle)", "evaluation": "\(entry.experimentName)",
            "run": "\(entry.name)", "client_pid": "\(entry.clientPID)", "uid": "\(entry.ownerUID)",
        ]
    }

    // MARK: What the handler waits for

    /// The uploaders of every destination this session wrote to.
    public var destinationsWritten: [Uploader] {
        lastLSNs.keys.map(services.destinations.uploader)
    }

    /// What must be on disk before everything handled so far may be acknowledged.
    public var durabilityWaits: [DurableWait] {
        lastLSNs.compactMap { key, lsn in lsn > 0 ? DurableWait(uploader: services.destinations.uploader(key), lsn: lsn) : nil }
    }

    /// What `flush wait=uploaded` waits for: every record of this session's runs settled (after
    /// a restart, with what the journal replayed of them).
    public var uploadWaits: [UploadWait] {
        lastTickets.map { key, ticket in UploadWait(uploader: services.destinations.uploader(key), ticket: ticket, runs: runsWritten[key] ?? []) }
    }

    /// What a run's creation waits for: the run's records up to the session's last one settled.
    public func creationWait(of entry: RunEntry) -> UploadWait {
        let uploader = services.destinations.uploader(entry.destination)
        return UploadWait(uploader: uploader, ticket: lastTickets[entry.destination] ?? uploader.lastTicket, runs: [entry.handle])
    }

    public func clearPause() { wantsPause = false }

    /// Metrics accepted since the last call.
    public func takeAcceptedMetrics() -> UInt64 { machine.takeAcceptedMetrics() }

    // MARK: Connections

    /// The handshake went through on connection `connectionID`; `resumed` when it continues
    /// the session after a reconnect (its runs are the client's again).
    public func accept(_ hello: Hello, destination: DestinationKey, connectionID: UInt64, peer: PeerCredentials, resumed: Bool) {
        self.connectionID = connectionID
        machine.accept(hello, destination: destination, assignsRunIDs: services.destinations.uploader(destination).assignsRunIDs, peer: peer)
        if !hello.admin { services.statistics.connected(.init(connection: connectionID, peer: peer, client: "\(hello.client) \(hello.clientVersion)", program: hello.program)) }
        guard resumed else { return }
        let handles = machine.record.runHandles
        services.registry.reattach(handles, connection: machine.number, clientPID: peer.pid)
        if awaitsReplayedRecords {
            // What the journal replayed of its runs is queued up to each uploader's last ticket.
            for entry in handles.compactMap({ services.registry.entry($0) }) {
                lastTickets[entry.destination] = max(lastTickets[entry.destination] ?? 0, services.destinations.uploader(entry.destination).lastTicket)
                runsWritten[entry.destination, default: []].insert(entry.handle)
            }
            awaitsReplayedRecords = false
        }
        services.logger.info("session resumed", metadata: ["session": "\(id)", "held": "\(handledSeq)", "client_pid": "\(peer.pid)", "uid": "\(peer.uid)"])
    }

    /// What `attach` found in `uploader`'s destination (see `SessionStateMachine.runFound`): the
    /// uploader learns a newly registered run before its records are queued.
    public func runFound(_ stored: StoredRun?, runID: String, in uploader: Uploader, for frame: ClientFrame) -> SessionAction {
        let (bind, action) = machine.runFound(stored, runID: runID, in: uploader.destination, for: frame)
        if let bind { uploader.attach(bind) }
        commit()
        return action
    }

    /// A resume moved the session to another connection: its later errors go there (`nil`: nowhere).
    public func reportTo(_ report: (@Sendable (ProtocolError) -> Void)?) {
        services.registry.setReporter(report, forConnection: machine.number)
    }

    /// The connection is gone: the session waits, detached, for its client to resume it. Its
    /// runs are detached; returns the handles of those left running.
    public func connectionClosed() -> [String] {
        commit()
        services.statistics.disconnected(connectionID)
        services.registry.setReporter(nil, forConnection: machine.number)
        return services.registry.detach(connection: machine.number)
    }

    /// Nobody resumed the session within the grace period: half-sent artifacts are dropped (its
    /// end is journaled and its runs end FAILED by whoever expired it: `SessionTable`'s owner).
    public func expire() {
        for id in Array(spoolFiles.keys) { discardSpool(artifact: id) }
    }

    // MARK: Spool files

    /// Creates an artifact's spool file; the failure in words, or nil.
    public func openSpool(artifact id: Int64, path: String) -> String? {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o666)  // the umask applies: it becomes a store file as it is (the spool directory is private)
        guard fd >= 0 else { return String(cString: strerror(errno)) }
        spoolFiles[id] = (fd, path)
        return nil
    }

    /// Appends a chunk to an artifact's spool file; the failure in words (the file is then
    /// removed), or nil.
    public func writeSpool(artifact id: Int64, bytes: [UInt8]) -> String? {
        guard let file = spoolFiles[id], let reason = FileWrites.writeAll(file.fd, bytes) else { return nil }
        discardSpool(artifact: id)
        return reason
    }

    /// Takes an artifact's finished spool file out of the session, to be put on disk
    /// (`putOnDisk`) off the event loop.
    public func takeSpool(artifact id: Int64) -> SpoolFile? {
        spoolFiles.removeValue(forKey: id).map { SpoolFile(fd: $0.fd, path: $0.path) }
    }

    private func discardSpool(artifact id: Int64) {
        guard let file = spoolFiles.removeValue(forKey: id) else { return }
        close(file.fd)
        unlink(file.path)
    }
}

/// A ticket of one uploader to wait for.
public struct UploadWait: Sendable {
    public var uploader: Uploader
    public var ticket: UInt64
    /// Only the records of these runs (nil: every record up to `ticket`).
    public var runs: Set<String>?
}

/// A journal sequence number of one uploader to wait for.
public struct DurableWait: Sendable {
    public var uploader: Uploader
    public var lsn: UInt64
}

/// An artifact's spool file, written and about to be closed.
public struct SpoolFile: Sendable {
    var fd: Int32
    var path: String

    /// Puts the file on disk (the journal will name it) and closes it; the failure in words (the
    /// file is then removed), or nil. It blocks for as long as the fsync takes: not on an event
    /// loop.
    public func putOnDisk() -> String? {
        defer { close(fd) }
        guard fsync(fd) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(path)
            return reason
        }
        return nil
    }
}
