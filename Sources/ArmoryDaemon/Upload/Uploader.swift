import ArmoryProtocol
import Foundation
import Logging
import MLflow

/// A record's outcome: its run's binding when it created one, or the refusal.
public typealias RecordCompletion = @Sendable (Result<UploadScheduler.Binding?, ProtocolError>) -> Void

/// Bounds on what a destination holds: in memory, and in its journal before producers pause.
public struct UploadBounds: Sendable {
    /// Bytes of queued records kept in memory; the rest waits on disk.
    public var memoryBytes: Int = 16 << 20
    /// The journal's size past which producers pause.
    public var maxBacklogBytes: Int = 8 << 30
    /// The part of `maxBacklogBytes` one uid may hold while another uid's records wait too:
    /// past it that user's connections pause, the others' go on.
    public var userShare: Double = 0.5

    public init(memoryBytes: Int = 16 << 20, maxBacklogBytes: Int = 8 << 30, userShare: Double = 0.5) {
        self.memoryBytes = memoryBytes
        self.maxBacklogBytes = maxBacklogBytes
        self.userShare = userShare
    }

    /// The bytes one uid may hold while others wait.
    var userShareBytes: Int { Int(Double(maxBacklogBytes) * userShare) }
}

/// One destination's half of the pipeline (docs/architecture.md, "The pipeline"): its
/// `JournalWriter`, which journals what sessions and syncs produce, and its `Sender`, which sends
/// what is journaled to the sink. Producers call the uploader; it calls down into the two.
///
/// Every record gets its journal sequence number; `whenSettled` tells a `flush wait=uploaded`
/// when everything up to one is settled (applied or refused). Memory stays bounded whatever the
/// backlog: past `memoryBytes` of queued records, new records live only in the journal and are
/// read back as the sink catches up. Producers are told to pause (connections stop reading) only
/// when the journal itself reaches `maxBacklogBytes`, by fair shares.
public final class Uploader: Sendable {
    private let writer: JournalWriter
    private let sender: Sender
    public var bounds: UploadBounds { writer.bounds }
    /// Where accepted records are made durable.
    public var journal: Journal { writer.journal }
    /// Where refused records are kept (`nil`: they are counted and reported, then dropped).
    public var deadLetters: DeadLetterFile? { sender.deadLetters }
    private var sink: any RecordSink { sender.sink }

    public init(
        sink: any RecordSink, bounds: UploadBounds = UploadBounds(), flushInterval: Double? = nil, journal: Journal, deadLetters: DeadLetterFile? = nil,
        registry: RunRegistry? = nil
    ) {
        sender = Sender(
            sink: sink, journal: journal, memoryBound: bounds.memoryBytes, flushInterval: flushInterval ?? sink.defaultFlushInterval, deadLetters: deadLetters,
            registry: registry)
        writer = JournalWriter(journal: journal, bounds: bounds, sender: sender)
    }

    public var destination: String { sink.destination }
    /// Whether the sink takes run ids assigned by the daemon (the local store does).
    public var assignsRunIDs: Bool { sink.assignsRunIDs }
    /// Calls the sink makes at once.
    public var concurrency: Int { sink.concurrency }
    /// The server's base URL (nil for a local store).
    public var serverURL: String? { sink.serverURL }

    public func start() { sender.start() }

    /// Runs a no-op on the sender's event loop under its state lock, then `done` (what the
    /// watchdog's health check waits for).
    public func checkResponsive(_ done: @escaping @Sendable () -> Void) { sender.checkResponsive(done) }

    // MARK: Producers

    /// What `enqueue` did: the last record's sequence number (what `whenSettled` takes), the
    /// journal's (what `whenDurable` takes), and whether producers should pause.
    public struct Enqueued: Sendable {
        public var ticket: UInt64
        public var lsn: UInt64
        public var overloaded: Bool
    }

    /// Journals and enqueues a record of run `handle`.
    @discardableResult
    public func enqueue(_ handle: String, _ record: SinkRecord, completion: RecordCompletion? = nil) -> Enqueued {
        enqueue([(handle, record, completion)])
    }

    /// Journals and enqueues records in order, in one append (a connection's read burst).
    /// `tail`, a journal-only entry (a session's record or mark), is appended right after them,
    /// in the same write: a restart finds both or neither. `uid`: the client user they come from,
    /// whose share of the backlog they count against (`overloaded` is then about that user).
    @discardableResult
    public func enqueue(_ records: [(handle: String, record: SinkRecord, completion: RecordCompletion?)], tail: JournalEntry? = nil, uid: UInt32? = nil) -> Enqueued {
        let appended = writer.append(records, tail: tail, uid: uid)
        return Enqueued(ticket: appended.lastRecord, lsn: appended.lsn, overloaded: appended.overloaded)
    }

    /// The destination's id of a handle's run, once it exists there.
    public func runID(of handle: String) -> String? { binding(of: handle)?.runID }

    /// A handle's run at the destination, once created.
    public func binding(of handle: String) -> UploadScheduler.Binding? { sender.binding(of: handle) }

    /// A run that already exists in MLflow (attached): its records need no create.
    public func attach(_ entry: RunEntry) {
        if let runID = entry.runID { sender.bind(entry.handle, .init(runID: runID, experimentID: entry.experimentID)) }
        _ = writer.append([], tail: .run(entry), uid: nil)
    }

    /// Queues again what the journal holds unsettled after a restart: runs keep their ids, a
    /// create that may have reached the server looks for its run first, artifacts whose spool
    /// file is gone were already stored. Past the memory bound the rest is read back later.
    public func replay(_ recovery: Journal.Recovery) { sender.replay(recovery) }

    /// Whether the journal holds `lsn` on disk.
    public func isDurable(_ lsn: UInt64) -> Bool { lsn == 0 || journal.isDurable(lsn) }

    /// Calls `callback` once the journal holds everything up to `lsn` on disk; `urgent` asks for
    /// the commit now instead of at the next group commit.
    public func whenDurable(_ lsn: UInt64, urgent: Bool = false, _ callback: @escaping @Sendable () -> Void) {
        guard lsn > 0 else { return callback() }
        journal.whenDurable(lsn, urgent: urgent, callback)
    }

    /// Looks a run up in the sink (for `attach`), off the caller's thread.
    public func findRun(runID: String, _ body: @escaping @Sendable (StoredRun?) -> Void) {
        let sink = sink
        Task(executorPreference: sender.executor) { body(await sink.findRun(runID: runID)) }
    }

    /// Calls the sink directly, off the caller's thread, for what is not queued per run
    /// (experiment lookups and tags).
    public func callSink<Value: Sendable>(
        _ work: @escaping @Sendable (any RecordSink) async throws(ProtocolError) -> Value,
        _ body: @escaping @Sendable (Result<Value, ProtocolError>) -> Void
    ) {
        let sink = sink
        Task(executorPreference: sender.executor) {
            do throws(ProtocolError) {
                body(.success(try await work(sink)))
            } catch {
                body(.failure(error))
            }
        }
    }

    /// Records queued in memory per run handle (the journal-only backlog is not broken down).
    public var pendingByRun: [String: Int] { sender.pendingByRun }

    /// The sequence number of the last record enqueued.
    public var lastTicket: UInt64 { writer.lastRecord }

    /// The counters, with the queue figures derived from the state.
    public var counterSnapshot: UploadCounters { sender.counters }

    /// Calls `callback` once every record up to sequence number `ticket` is settled, of `runs`
    /// only unless nil (another user's backlog does not hold a session's flush back); asks for
    /// them to be sent without waiting for fuller batches meanwhile.
    public func whenSettled(upTo ticket: UInt64, runs: Set<String>? = nil, _ callback: @escaping @Sendable () -> Void) {
        sender.whenSettled(upTo: ticket, runs: runs, callback)
    }

    /// How many of the records up to sequence number `ticket` are not settled yet.
    public func pending(upTo ticket: UInt64) -> Int { sender.pending(upTo: ticket) }

    /// Whether producers of `uid` (nil: any) should pause now.
    public func isOverloaded(uid: UInt32? = nil) -> Bool { writer.isOverloaded(uid: uid) }

    /// Calls `callback` once producers of `uid` may go on: the journal (and the user's share)
    /// back under three quarters of the bound.
    public func whenDrained(uid: UInt32? = nil, _ callback: @escaping @Sendable () -> Void) {
        writer.whenDrained(uid: uid, callback)
    }

    /// Journal bytes not yet settled, per client uid (what fair shares weigh).
    public var backlogByUID: [UInt32: Int] { writer.backlogByUID }

    /// Why the server refuses the credentials, while it does (`needs-credentials`).
    public var needsCredentials: String? { sender.needsCredentials }

    /// Replaces the sink's credentials (rotated ones); what waited for them is sent at once.
    /// Returns whether they changed.
    @discardableResult
    public func useCredentials(_ credentials: MLflowCredentials) -> Bool {
        guard sink.useCredentials(credentials) else { return false }
        sender.credentialsReplaced()
        Logger(label: "armoryd").notice("destination has new credentials: uploads resume", metadata: ["destination": "\(destination)"])
        return true
    }

    /// Sends what is queued (without batching delays), then stops; waits at most `timeout`
    /// seconds, and not at all while the server refuses the credentials. Returns the number of
    /// records left unsent (they stay in the journal).
    public func shutdown(timeout: Double) async -> Int {
        let unsent = await sender.shutdown(timeout: timeout)
        journal.close()
        return unsent
    }

    /// Queues dead letters again (`armoryctl errors --retry`), each run under a fresh handle
    /// bound to its run id (a refused creation creates it again); once the journal holds them they
    /// leave the dead-letter file. Those refused again come back as new lines.
    public func retry(_ lines: [DeadLetterLine]) {
        guard let deadLetters = sender.deadLetters, !lines.isEmpty else { return }
        var handles: [String: String] = [:]
        func bound(_ runID: String, owner: UInt32) -> String {
            if let handle = handles[runID] { return handle }
            let handle = "retry-" + RunIDs.newHandle()
            handles[runID] = handle
            // Finished: a restart does not take it for a client's run left running.
            attach(
                RunEntry(
                    handle: handle, runID: runID, experimentID: nil, experimentName: "", name: "", ownerUID: owner, status: .finished,
                    parentHandle: nil, params: [:], connection: nil, clientPID: 0))
            return handle
        }
        var records: [(handle: String, record: SinkRecord, completion: RecordCompletion?)] = []
        for line in lines {
            var record = line.record
            let handle: String
            if let runID = line.runID {
                handle = bound(runID, owner: line.uid)
            } else {
                handle = handles["create " + line.handle] ?? "retry-" + RunIDs.newHandle()
                handles["create " + line.handle] = handle
                if case .createRun(var creation) = record {
                    creation.handle = handle
                    creation.parentHandle = line.parentRunID.map { bound($0, owner: line.uid) }
                    record = .createRun(creation)
                }
            }
            records.append((handle, record, nil))
        }
        let lsn = enqueue(records).lsn
        whenDurable(lsn, urgent: true) { deadLetters.remove(lines) }
    }
}
