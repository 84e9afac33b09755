import ArmoryProtocol
import Synchronization

/// The identity of a connected process, from the socket (`SO_PEERCRED`), never from the client.
public struct PeerCredentials: Sendable, Equatable {
    public var uid: UInt32
    public var gid: UInt32
    public var pid: Int32

    public init(uid: UInt32, gid: UInt32, pid: Int32) {
        self.uid = uid
        self.gid = gid
        self.pid = pid
    }
}

/// One run the daemon tracks, whichever connection created or attached it.
public struct RunEntry: Sendable, Equatable {
    public var handle: String
    /// MLflow's id: at once on the local store, once `runs/create` succeeded on a server.
    public var runID: String?
    public var experimentID: String?
    public var experimentName: String
    public var name: String
    public var ownerUID: UInt32
    public var status: RunStatus
    public var parentHandle: String?
    /// Params already logged (MLflow params are immutable: a different value is refused).
    public var params: StringMap
    /// The connection writing to it, or `nil` when its client is gone.
    public var connection: UInt64?
    public var clientPID: Int32
    public var endTime: Int64?
    /// Why the run could not be created, if it could not.
    public var failure: ProtocolError?
    /// The destination it is written to.
    public var destination = DestinationKey.primary
    /// Whether the daemon logs `system/...` metrics to it (tag `armory.system_metrics: off`, or
    /// the client's `hello`, turns them off).
    public var systemMetrics = true

    public var descriptor: RunDescriptor {
        RunDescriptor(handle: handle, runID: runID, experimentID: experimentID, name: name, status: status, parentHandle: parentHandle)
    }
}

/// All runs known to the daemon, shared by every connection.
public final class RunRegistry: Sendable {
    private let runs = Mutex<[String: RunEntry]>([:])
    /// How to tell each connected session about a refusal found after its call returned.
    private let reporters = Mutex<[UInt64: @Sendable (ProtocolError) -> Void]>([:])

    public init() {}

    public func insert(_ entry: RunEntry) {
        runs.withLock { $0[entry.handle] = entry }
    }

    public func entry(_ handle: String) -> RunEntry? {
        runs.withLock { $0[handle] }
    }

    public func entry(runID: String) -> RunEntry? {
        runs.withLock { $0.values.first { $0.runID == runID } }
    }

    /// Mutates the entry under the lock; returns what `body` returns, or nil for an unknown handle.
    @discardableResult
    public func update<T>(_ handle: String, _ body: (inout RunEntry) throws(ProtocolError) -> T) throws(ProtocolError) -> T? {
        try runs.withLock { (all: inout [String: RunEntry]) throws(ProtocolError) -> T? in
            guard var entry = all[handle] else { return nil }
            let result = try body(&entry)
            all[handle] = entry
            return result
        }
    }

    /// Runs still RUNNING.
    public var activeRuns: [RunEntry] {
        runs.withLock { $0.values.filter { $0.status == .running }.sorted { $0.handle < $1.handle } }
    }

    /// A resumed session's runs are written by it again (those nobody else took meanwhile).
    public func reattach(_ handles: [String], connection: UInt64, clientPID: Int32) {
        runs.withLock { all in
            for handle in handles where all[handle] != nil && all[handle]!.connection == nil {
                all[handle]!.connection = connection
                all[handle]!.clientPID = clientPID
            }
        }
    }

    /// Detaches every run of a closed connection; returns the handles of those still running.
    public func detach(connection: UInt64) -> [String] {
        runs.withLock { all in
            var orphans: [String] = []
            for (handle, entry) in all where entry.connection == connection {
                all[handle]!.connection = nil
                if entry.status == .running { orphans.append(handle) }
            }
            return orphans
        }
    }

    /// Where errors about the runs of session `connection` go (`nil`: it has no connection now).
    public func setReporter(_ reporter: (@Sendable (ProtocolError) -> Void)?, forConnection connection: UInt64) {
        reporters.withLock { $0[connection] = reporter }
    }

    /// Tells the session writing to run `handle` about a refusal, if it is connected.
    public func report(_ error: ProtocolError, toWriterOf handle: String) {
        guard let connection = entry(handle)?.connection, let reporter = reporters.withLock({ $0[connection] }) else { return }
        reporter(error)
    }
}
