import ArmoryProtocol
import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// What every session shares: the run registry, the uploader, the daemon's settings.
public final class DaemonServices: Sendable {

    public let registry: RunRegistry
    /// The daemon's own destination.
    public var uploader: Uploader { destinations.primary }
    public let destinations: Destinations
    public let limits: ProtocolLimits
    /// Where artifacts are copied before the caller's call returns.
    public let spoolDirectory: String
    public let startedAt: Date
    public let socketPath: String
    public let statistics = DaemonStatistics()
    /// The host's latest figures, when the daemon samples system metrics.
    public let host = HostFigures()
    /// Run lifecycle events (journald fields `RUN_ID`, `EVALUATION`, `CLIENT_PID`, …).
    public let logger: Logger
    /// `armoryctl sync` jobs.
    public let syncs: SyncJobs
    /// Client sessions, attached or waiting to be resumed.
    public let sessions: SessionTable

    /// Members of this group (and root, and the daemon's own user) see every user's runs and dead letters.
    public let adminGroup: String

    public init(
        registry: RunRegistry, destinations: Destinations, limits: ProtocolLimits = .default, spoolDirectory: String, socketPath: String,
        localStore: String? = nil, logger: Logger = Logger(label: "armoryd"), sessions: SessionTable? = nil, adminGroup: String = "armory-admin"
    ) {
        self.logger = logger
        self.adminGroup = adminGroup
        self.sessions =
            sessions
            ?? SessionTable(
                graceSeconds: 60,
                schedule: { seconds, body in
                    EventLoopClock.after(seconds: seconds, body)
                }, onExpired: { session, _ in session?.expire() })
        self.syncs = SyncJobs(localStore: localStore)
        self.registry = registry
        self.destinations = destinations
        self.limits = limits
        self.spoolDirectory = spoolDirectory
        self.startedAt = Date()
        self.socketPath = socketPath
    }

    /// Whether a peer sees every user's runs: root, the daemon's own user, or a member of
    /// `adminGroup` (its primary group or a supplementary one).
    public func isAdmin(_ peer: PeerCredentials) -> Bool {
        if peer.uid == 0 || peer.uid == getuid() { return true }
        var group = Glibc.group()
        var found: UnsafeMutablePointer<Glibc.group>?
        var buffer = [CChar](repeating: 0, count: 16384)
        guard getgrnam_r(adminGroup, &group, &buffer, buffer.count, &found) == 0, found != nil else { return false }
        let admins = group.gr_gid
        if peer.gid == admins { return true }
        let name = Self.userName(uid: peer.uid)
        var count: Int32 = 64
        var groups = [gid_t](repeating: 0, count: Int(count))
        if getgrouplist(name, peer.gid, &groups, &count) < 0 {
            groups = [gid_t](repeating: 0, count: Int(count))
            guard getgrouplist(name, peer.gid, &groups, &count) >= 0 else { return false }
        }
        return groups.prefix(Int(count)).contains(admins)
    }

    /// The user name of a uid (for `mlflow.user`), or the number when it has none.
    public static func userName(uid: UInt32) -> String {
        var pwd = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buffer = [CChar](repeating: 0, count: 4096)
        if getpwuid_r(uid, &pwd, &buffer, buffer.count, &result) == 0, let entry = result, let name = entry.pointee.pw_name {
            return String(cString: name)
        }
        return String(uid)
    }
}

/// Daemon-wide counters for status, updated from every connection.
public final class DaemonStatistics: Sendable {
    private struct State {
        var clients: [UInt64: ClientInfo] = [:]
        var framesReceived: UInt64 = 0
        var metricsAccepted: UInt64 = 0
        var errorsSent: UInt64 = 0
        var lastRefusal: Refusal?
    }

    /// An error the daemon sent a client, as status shows the latest one.
    public struct Refusal: Sendable, Equatable {
        public var timeMs: Int64
        public var error: ProtocolError
        public var uid: UInt32
        public var pid: Int32

        public var json: JSONObject {
            [
                "time_ms": .int(timeMs), "code": .string(error.code.rawValue), "op": error.op.map { .string($0) } ?? .null,
                "key": error.key.map { .string($0) } ?? .null, "message": .string(error.message), "uid": .int(Int64(uid)), "pid": .int(Int64(pid)),
            ]
        }
    }

    /// One connected client, as status shows it.
    public struct ClientInfo: Sendable, Equatable {
        public var connection: UInt64
        public var peer: PeerCredentials
        public var client: String
        public var program: String
    }

    private let state = Mutex(State())

    public func connected(_ info: ClientInfo) { state.withLock { $0.clients[info.connection] = info } }
    public func disconnected(_ connection: UInt64) { state.withLock { _ = $0.clients.removeValue(forKey: connection) } }
    public func count(frames: UInt64, metrics: UInt64) {
        state.withLock {
            $0.framesReceived &+= frames
            $0.metricsAccepted &+= metrics
        }
    }

    /// An error was sent to the client `peer`.
    public func refused(_ error: ProtocolError, peer: PeerCredentials) {
        let refusal = Refusal(timeMs: WallClock.nowMs(), error: error, uid: peer.uid, pid: peer.pid)
        state.withLock {
            $0.errorsSent &+= 1
            $0.lastRefusal = refusal
        }
    }

    /// The latest error sent to a client.
    public var lastRefusal: Refusal? { state.withLock { $0.lastRefusal } }

    public var clients: [ClientInfo] { state.withLock { $0.clients.values.sorted { $0.connection < $1.connection } } }
    public var totals: (frames: UInt64, metrics: UInt64, errors: UInt64) {
        state.withLock { ($0.framesReceived, $0.metricsAccepted, $0.errorsSent) }
    }
}
