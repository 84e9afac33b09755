import ArmoryProtocol
import Foundation
import Logging
import MLflow
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Everything armoryd needs to start; `armoryd`'s flags and environment fill it in.
public struct DaemonConfiguration: Sendable {
    public var socketPath: String
    /// A listening socket handed over by systemd's socket activation: served as is, never
    /// unlinked (`socketPath` is where it is bound).
    public var adoptedSocket: Int32?
    /// The socket's directory is created when missing (the default paths); a path the user
    /// named must be in a directory that exists.
    public var createsSocketDirectory = false
    /// The local MLflow store (`$ARMORY_HOME/mlruns`).
    public var storeRoot: String
    /// Daemon-owned state (spool, journal): `$ARMORY_HOME/state`.
    public var stateDirectory: String
    /// Mode of the socket file: 0600 for a user's daemon, 0660 (group `armory`) for the system unit.
    public var socketMode: mode_t = 0o600
    /// Connections served at once; one more is told so and closed.
    public var maxConnections = 1024
    public var limits: ProtocolLimits = .default
    /// How long runs of a vanished client wait for a reattach before they end FAILED.
    public var orphanGraceSeconds: Double = 60
    /// How long SIGTERM waits for queued records to reach the sink.
    public var shutdownDrainSeconds: Double = 30
    public var eventLoopThreads: Int = max(1, min(4, System.coreCount))
    /// What uploaders hold in memory, and the journal size past which connections stop reading
    /// until the sink catches up.
    public var bounds = UploadBounds()
    /// An MLflow server to write to instead of the local store (the daemon's `MLFLOW_TRACKING_URI`).
    public var server: MLflowDestination?
    /// Credentials per server, re-read on `reloadCredentials` (SIGHUP), later files winning:
    /// `/etc/armory/credentials` (the system daemon's: mode 0600, owned by its user), then
    /// `<home>/credentials`; files it cannot read are skipped.
    public var credentialsFiles: [String] = []
    /// Destinations other than the daemon's own one uid may name (`TOO_MANY_DESTINATIONS` past it).
    public var maxDestinationsPerUser = 4
    /// Members see every user's runs in `status`, and every dead letter (`--admin-group`).
    public var adminGroup = "armory-admin"
    /// Records are journaled and then discarded (`null:`): the daemon's own cost, for benchmarks.
    public var discardsRecords = false
    /// Sink calls in flight at once (REST).
    public var uploadConcurrency: Int = 4
    /// How long log records wait for a fuller batch (REST).
    public var flushInterval: Double = 1
    /// Per-request timeout (REST).
    public var requestTimeout: Double = 30
    /// How the journal under `stateDirectory/journal` commits (group-commit interval, fsync).
    public var journal = Journal.Options()
    /// Seconds between samples of system metrics logged to every active run (0: none).
    public var systemMetricsInterval: Double = 10

    public init(socketPath: String, storeRoot: String, stateDirectory: String) {
        self.socketPath = socketPath
        self.storeRoot = storeRoot
        self.stateDirectory = stateDirectory
    }
}

/// Why the daemon could not start.
public enum DaemonStartError: Error, CustomStringConvertible {
    case alreadyRunning(String)
    case socket(String)
    case store(String)

    public var description: String {
        switch self {
        case .alreadyRunning(let path): "Another armoryd is already serving \(path). Stop it first (`armoryctl --socket \(path) stop`; under systemd, `systemctl stop armoryd`), or start this one with --socket PATH."
        case .socket(let message): message
        case .store(let message): message
        }
    }
}

/// The daemon: binds the socket, serves sessions, drains the uploader, shuts down gracefully.
public final class Daemon: Service {
    public let configuration: DaemonConfiguration
    private let logger: Logger
    private let readiness: (@Sendable (String) -> Void)?
    private let running = Mutex<Running?>(nil)

    /// What a started daemon's health checks and status line look at.
    private struct Running: @unchecked Sendable {
        let group: MultiThreadedEventLoopGroup
        let services: DaemonServices
    }

    /// `onReady` is called once the socket accepts connections.
    public init(configuration: DaemonConfiguration, logger: Logger, onReady: (@Sendable (String) -> Void)? = nil) {
        self.configuration = configuration
        self.logger = logger
        self.readiness = onReady
    }

    /// Reads the credentials file again (SIGHUP): returns the servers whose credentials changed.
    public func reloadCredentials() -> [String] {
        running.withLock { $0?.services }?.destinations.reloadCredentials() ?? []
    }

    /// A one-line summary (systemd's `STATUS=`): state, clients, active runs, backlog, last upload.
    public var statusLine: String {
        guard let services = running.withLock({ $0?.services }) else { return "starting" }
        return StatusReport.summary(services: services)
    }

    /// What keeps the daemon from serving, checked for systemd's watchdog: every event loop and
    /// every uploader (its loop and its lock) must run a no-op within `seconds`. Empty when healthy.
    public func healthProblems(within seconds: Double) async -> [String] {
        guard let running = running.withLock({ $0 }) else { return ["not started"] }
        var checks: [(String, @Sendable (@escaping @Sendable () -> Void) -> Void)] = []
        for (index, loop) in running.group.makeIterator().enumerated() {
            checks.append(("event loop \(index)", { done in loop.execute(done) }))
        }
        for uploader in running.services.destinations.all {
            checks.append(("uploader for \(uploader.destination)", { done in uploader.checkResponsive(done) }))
        }
        // All at once, under one timer: a round wakes each loop once and the supervisor's twice.
        let answered = Mutex((flags: [Bool](repeating: false, count: checks.count), left: checks.count, finished: false))
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let finish: @Sendable () -> Void = {
                let first = answered.withLock { state in
                    defer { state.finished = true }
                    return !state.finished
                }
                if first { continuation.resume() }
            }
            guard !checks.isEmpty else { return finish() }
            let timeout = EventLoopClock.after(seconds: seconds) { finish() }
            for (index, (_, check)) in checks.enumerated() {
                check {
                    let all = answered.withLock { state -> Bool in
                        state.flags[index] = true
                        state.left -= 1
                        return state.left == 0
                    }
                    if all {
                        timeout.cancel()
                        finish()
                    }
                }
            }
        }
        let flags = answered.withLock { $0.flags }
        return zip(checks, flags).filter { !$0.1 }.map { "\($0.0.0) did not respond within \(seconds) s" }
    }

    public func run() async throws {
        let config = configuration
        // The socket first: a start that is refused (another daemon serves it) creates nothing.
        if config.adoptedSocket == nil { try prepareSocketPath(config.socketPath) }
        let spool = config.stateDirectory + "/spool"
        for dir in [config.stateDirectory, spool] {
            do throws(Directories.Failure) { try Directories.create(dir, mode: 0o700) } catch {
                throw DaemonStartError.store("\(error) Set ARMORY_HOME (or --home) to a writable directory.")
            }
        }
        let settings = Destinations.Settings(
            bounds: config.bounds, uploadConcurrency: config.uploadConcurrency, flushInterval: config.flushInterval,
            requestTimeout: config.requestTimeout, tls: config.server?.tls ?? MLflowTLSSettings.resolve(environment: ProcessInfo.processInfo.environment),
            journalRoot: config.stateDirectory + "/journal", journalOptions: config.journal,
            deadLetterRoot: config.stateDirectory + "/dead-letters", credentialsFiles: config.credentialsFiles,
            maxDestinationsPerUser: config.maxDestinationsPerUser,
            daemonCredentials: config.server?.credentials ?? MLflowCredentials())
        let sink: any RecordSink
        do {
            if config.discardsRecords {
                sink = NullSink()
            } else if let server = config.server {
                sink = try settings.sinks.server(server)
            } else {
                sink = try settings.sinks.sink(uri: config.storeRoot, credentials: MLflowCredentials())
            }
        } catch {
            throw DaemonStartError.store(error.message)
        }

        let eventLoops = MultiThreadedEventLoopGroup(numberOfThreads: config.eventLoopThreads)
        let registry = RunRegistry()
        let restored = Mutex<[String]>([])
        let servicesBox = Mutex<DaemonServices?>(nil)
        let timerLoop = eventLoops.next()
        let logger = logger
        let sessions = SessionTable(
            graceSeconds: config.orphanGraceSeconds,
            schedule: { seconds, body in
                timerLoop.scheduleTask(in: .milliseconds(Int64(seconds * 1000))) { body() }
            },
            onExpired: { session, record in
                guard let services = servicesBox.withLock({ $0 }) else { return }
                session?.expire()
                // Its record may be in any destination's journal (a resume may name another one).
                if let id = session.map({ $0.journaled ? $0.id : nil }) ?? record?.id {
                    for uploader in services.destinations.all { uploader.enqueue([], tail: .sessionEnd(id: id)) }
                }
                Self.endOrphans(session?.record.runHandles ?? record?.runHandles ?? [], services: services, logger: logger)
            })
        let destinations: Destinations
        do {
            destinations = try Destinations(
                primarySink: sink, primaryServer: config.server, settings: settings, registry: registry,
                onRestoredRuns: { handles in
                    restored.withLock { $0.append(contentsOf: handles) }
                },
                onRestoredSessions: { records in
                    sessions.restore(records)
                })
        } catch {
            try? await eventLoops.shutdownGracefully()
            throw DaemonStartError.store(error.message)
        }
        let services = DaemonServices(
            registry: registry, destinations: destinations, limits: config.limits, spoolDirectory: spool,
            socketPath: config.socketPath, localStore: config.server == nil && !config.discardsRecords ? config.storeRoot : nil, logger: logger,
            sessions: sessions, adminGroup: config.adminGroup)
        servicesBox.withLock { $0 = services }
        let waiting = sessions.counts.waiting
        if waiting > 0 { logger.notice("sessions restored, waiting for their clients", metadata: ["sessions": "\(waiting)", "grace_s": "\(config.orphanGraceSeconds)"]) }
        removeUnreferencedSpoolFiles(spool, destinations: destinations)
        let recovery = destinations.recoveryReport
        if recovery.records > 0 || recovery.runs > 0 || recovery.corruptRecords > 0 || recovery.truncatedBytes > 0 {
            logger.notice(
                "journal replayed",
                metadata: [
                    "records": "\(recovery.records)", "runs": "\(recovery.runs)", "bytes": "\(recovery.bytes)",
                    "corrupt_records": "\(recovery.corruptRecords)", "truncated_bytes": "\(recovery.truncatedBytes)",
                    "seconds": "\(String(format: "%.3f", recovery.seconds))",
                ])
        }
        for error in recovery.errors { logger.error("journal could not be replayed", metadata: ["error": "\(error)"]) }
        scheduleOrphanCheck(restored.withLock { $0 }, services: services, on: eventLoops.next())

        let listener = SocketListener(configuration: config, services: services, logger: logger)
        do {
            try await listener.bind(group: eventLoops)
        } catch {
            _ = await destinations.shutdown(timeout: 1)
            try? await eventLoops.shutdownGracefully()
            throw DaemonStartError.socket("Cannot listen on \(config.socketPath): \(Self.explain(error)).")
        }
        running.withLock { $0 = Running(group: eventLoops, services: services) }
        logger.notice(
            "armoryd \(DaemonVersion.current) ready",
            metadata: [
                "socket": "\(config.socketPath)", "store": "\(sink.destination)", "socket_activated": "\(config.adoptedSocket != nil)",
            ])
        readiness?(config.socketPath)

        // The daemon's long-lived parts. A graceful shutdown stops them in reverse order: the
        // listener first (no new connections, every connection closed), then the sync jobs and
        // the system-metrics sampler, so nothing is enqueued once the uploaders drain.
        var parts: [any Service] = [UploadDrain(destinations: destinations, boundSeconds: config.shutdownDrainSeconds, logger: logger)]
        if config.systemMetricsInterval > 0 {
            parts.append(
                SystemMetricsService(
                    services: services, interval: config.systemMetricsInterval, sampler: SystemSampler(diskPath: config.stateDirectory), loop: eventLoops.next()))
        }
        parts.append(services.syncs)
        parts.append(listener)
        let lifecycle = ServiceGroup(
            configuration: ServiceGroupConfiguration(
                services: parts.map { .init(service: $0, successTerminationBehavior: .gracefullyShutdownGroup) }, logger: logger))
        try await withGracefulShutdownHandler {
            try await lifecycle.run()
        } onGracefulShutdown: {
            Task { await lifecycle.triggerGracefulShutdown() }
        }
        try? await eventLoops.shutdownGracefully()
        logger.notice("armoryd stopped")
    }

    /// Half-received artifacts of a previous life cannot be completed (their clients got no
    /// answer); finished ones the journal still names are kept for upload.
    private func removeUnreferencedSpoolFiles(_ spool: String, destinations: Destinations) {
        let kept = destinations.recoveryReport.spoolFiles
        for leftover in (try? FileManager.default.contentsOfDirectory(atPath: spool)) ?? [] where !kept.contains(spool + "/" + leftover) {
            try? FileManager.default.removeItem(atPath: spool + "/" + leftover)
        }
    }

    /// After the grace period, runs restored from the journal that no session took end FAILED.
    private func scheduleOrphanCheck(_ handles: [String], services: DaemonServices, on loop: EventLoop) {
        guard !handles.isEmpty else { return }
        let logger = logger
        loop.scheduleTask(in: .milliseconds(Int64(configuration.orphanGraceSeconds * 1000))) {
            Self.endOrphans(handles, services: services, logger: logger)
        }
    }

    /// Ends FAILED those of `handles` still running with no session writing them (their client vanished).
    static func endOrphans(_ handles: [String], services: DaemonServices, logger: Logger) {
        for handle in handles {
            let now = WallClock.nowMs()
            let ended =
                (try? services.registry.update(handle) { entry -> RunEntry? in
                    guard entry.connection == nil, entry.status == .running else { return nil }
                    entry.status = .failed
                    entry.endTime = now
                    return entry
                }) ?? nil
            if let ended = ended ?? nil {
                logger.warning("client vanished: run ended FAILED", metadata: ["run_id": "\(ended.runID ?? handle)", "run": "\(ended.name)", "client_pid": "\(ended.clientPID)"])
                services.destinations.uploader(ended.destination).enqueue(handle, .updateRun(status: .failed, endTime: now))
            }
        }
    }

    /// Creates the socket's directory, refuses to start when a live daemon answers there, and
    /// removes a stale socket file left by a daemon that died.
    private func prepareSocketPath(_ path: String) throws {
        guard path.utf8.count < 108 else {
            throw DaemonStartError.socket("Socket path \(path) is too long for a Unix socket (at most 107 bytes); choose a shorter --socket.")
        }
        let directory = (path as NSString).deletingLastPathComponent
        var directoryInfo = stat()
        if stat(directory.isEmpty ? "." : directory, &directoryInfo) != 0 {
            guard configuration.createsSocketDirectory else {
                throw DaemonStartError.socket("Cannot listen on \(path): the directory \(directory) does not exist. Create it first, or choose another --socket.")
            }
            do throws(Directories.Failure) { try Directories.create(directory, mode: 0o700) } catch {
                throw DaemonStartError.socket("Cannot create the socket's directory: \(error)")
            }
        } else if (directoryInfo.st_mode & S_IFMT) != S_IFDIR {
            throw DaemonStartError.socket("Cannot listen on \(path): \(directory) is a file, not a directory. Choose another --socket.")
        }
        var info = stat()
        guard lstat(path, &info) == 0 else { return }
        guard (info.st_mode & S_IFMT) == S_IFSOCK else {
            throw DaemonStartError.socket("\(path) exists and is not a socket; remove it or choose another --socket.")
        }
        if Self.somebodyAnswers(path) { throw DaemonStartError.alreadyRunning(path) }
        logger.info("removing stale socket", metadata: ["socket": "\(path)"])
        unlink(path)
    }

    /// A bind failure in words (NIO's errors name the system call).
    static func explain(_ error: Error) -> String {
        guard let io = error as? IOError else { return "\(error)" }
        switch io.errnoCode {
        case EACCES, EPERM: return "permission denied: uid \(getuid()) may not create a socket in that directory"
        case EADDRINUSE: return "the address is in use (another program listens there)"
        case ENOTDIR: return "a component of the path is not a directory"
        case ENOENT: return "the directory does not exist"
        case EROFS: return "the file system is read-only"
        default: return String(cString: strerror(io.errnoCode)).lowercased()
        }
    }

    static func somebodyAnswers(_ path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let bytes = Array(path.utf8.prefix(raw.count - 1))
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        return result == 0
    }
}
