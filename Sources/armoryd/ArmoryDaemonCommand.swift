#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import ArmoryDaemon
import ArmoryProtocol
import Foundation
import Logging
import MLflow
import ServiceLifecycle
import Systemd

/// `armoryd`: the per-host tracking daemon.
@main
struct ArmoryDaemonCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "armoryd",
        abstract: "Durable, fast experiment tracking for Armory evaluations, into MLflow.",
        discussion: """
            Serves Armory clients on a Unix socket and writes their runs to the local MLflow store \
            ($ARMORY_HOME/mlruns, default ~/.armory/mlruns).

            Socket: --socket, else $ARMORY_SOCKET, else $XDG_RUNTIME_DIR/armory/armoryd.sock \
            (/run/armory/armoryd.sock for root).
            """,
        version: DaemonServices.version)

    @Option(help: "Unix socket to listen on.")
    var socket: String?

    @Option(help: "Armory home: the store is <home>/mlruns, daemon state <home>/state. Default: $ARMORY_HOME, else ~/.armory.")
    var home: String?

    @Option(help: "Largest frame accepted, in bytes.")
    var maxFrameBytes: Int = ProtocolLimits.default.maxFrameBytes

    @Option(help: "Seconds the runs of a vanished client wait for a reattach before they end FAILED.")
    var orphanGrace: Double = 60

    @Option(help: "Seconds SIGTERM waits for queued records to reach the store.")
    var shutdownDrain: Double = 30

    @Option(help: "MLflow tracking server (http(s)://…) or local store (file:///…) to write to. Default: $MLFLOW_TRACKING_URI, else <home>/mlruns.")
    var trackingURI: String?

    @Option(help: "Requests in flight at once to an MLflow server.")
    var uploadConcurrency: Int = 4

    @Option(help: "Seconds metrics wait for a fuller batch before they are sent to an MLflow server.")
    var flushInterval: Double = 1

    @Option(help: "Seconds one request to the MLflow server may take.")
    var requestTimeout: Double = 30

    @Option(help: "Milliseconds the journal's group commit waits for more records before it fsyncs (a flush commits at once).")
    var journalCommitMs: Double = 50

    @Option(help: "Whether the journal fsyncs: 'off' survives a daemon crash but not a power cut (for measuring only).")
    var journalFsync: Toggle = .on

    @Option(help: "Largest journal backlog on disk (bytes; K, M, G suffixes) before clients are slowed down until the destination catches up.")
    var maxBacklogBytes: ByteCount = ByteCount(8 << 30)

    @Option(help: "Bytes of queued records each destination keeps in memory; the rest of the backlog waits in the journal on disk.")
    var memoryBacklogBytes: ByteCount = ByteCount(64 << 20)

    @Option(help: "Mode of the socket file, in octal: 600 lets only this user in, 660 its group too.")
    var socketMode: String = "600"

    @Option(help: "Connections served at once.")
    var maxConnections: Int = 1024

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical. Default: $ARMORY_LOG_LEVEL, else info.")
    var logLevel: String?

    func run() async throws {
        let environment = ProcessInfo.processInfo.environment
        let levelName = logLevel ?? environment["ARMORY_LOG_LEVEL"] ?? "info"
        guard let level = Logger.Level(rawValue: levelName) else {
            throw ValidationError("Unknown log level '\(levelName)': use trace, debug, info, notice, warning, error or critical.")
        }
        // Under systemd, stderr is the journal: structured entries instead of plain lines.
        let toJournal = JournalLogHandler.stderrIsJournal(environment: environment)
        LoggingSystem.bootstrap { label in
            if toJournal {
                var handler = JournalLogHandler(label: label)
                handler.logLevel = level
                return handler
            }
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "armoryd")

        // Socket activation: systemd passes the listening socket; armoryd serves it as is.
        let activated = SocketActivation.listeningSockets()
        let adopted = activated.first { $0.name == "armoryd" } ?? activated.first
        if let adopted, !SocketActivation.isListeningUnixStream(adopted.descriptor) {
            throw ValidationError("systemd passed socket '\(adopted.name)' (fd \(adopted.descriptor)), which is not a listening Unix stream socket: set ListenStream=/path in armoryd.socket.")
        }
        let adoptedPath = adopted.flatMap { SocketActivation.boundPath($0.descriptor) }
        guard let socketPath = adoptedPath ?? SocketDiscovery.daemonPath(flag: socket, environment: environment, isRoot: getuid() == 0) else {
            throw ValidationError("No socket path: XDG_RUNTIME_DIR is not set. Pass --socket PATH or set ARMORY_SOCKET.")
        }
        guard maxFrameBytes >= 1024 else { throw ValidationError("--max-frame-bytes must be at least 1024.") }
        let armoryHome = home ?? environment["ARMORY_HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? (NSHomeDirectory() + "/.armory")
        let absoluteHome = armoryHome.hasPrefix("/") ? armoryHome : FileManager.default.currentDirectoryPath + "/" + armoryHome

        var config = DaemonConfiguration(socketPath: socketPath, storeRoot: absoluteHome + "/mlruns", stateDirectory: absoluteHome + "/state")
        config.adoptedSocket = adopted?.descriptor
        let uri = trackingURI ?? environment["MLFLOW_TRACKING_URI"].flatMap { $0.isEmpty ? nil : $0 }
        if let uri, !uri.hasPrefix("armoryd:") {
            if MLflowDestination.isRemote(uri) {
                config.server = MLflowDestination(
                    trackingURI: uri,
                    credentials: MLflowCredentials.resolve(environment: environment),
                    tls: MLflowTLSSettings.resolve(environment: environment))
            } else if uri.hasPrefix("file:") || uri.hasPrefix("/") {
                let path = uri.hasPrefix("file://") ? String(uri.dropFirst(7)) : (uri.hasPrefix("file:") ? String(uri.dropFirst(5)) : uri)
                config.storeRoot = path.removingPercentEncoding ?? path
            } else {
                throw ValidationError("Unsupported tracking URI '\(MLflowDestination.stripUserInfo(uri))': use http(s)://… for an MLflow server or file:///… for a local store.")
            }
        }
        guard uploadConcurrency >= 1, flushInterval >= 0, requestTimeout > 0 else {
            throw ValidationError("--upload-concurrency must be ≥ 1, --flush-interval ≥ 0, --request-timeout > 0.")
        }
        config.uploadConcurrency = uploadConcurrency
        config.flushInterval = flushInterval
        config.requestTimeout = requestTimeout
        config.limits.maxFrameBytes = maxFrameBytes
        config.orphanGraceSeconds = orphanGrace
        config.shutdownDrainSeconds = shutdownDrain
        config.journal.commitInterval = max(0, journalCommitMs) / 1000
        config.journal.fsync = journalFsync == .on
        guard let mode = mode_t(socketMode, radix: 8), mode <= 0o777 else {
            throw ValidationError("--socket-mode '\(socketMode)' is not an octal file mode such as 600 or 660.")
        }
        config.socketMode = mode
        config.maxConnections = max(1, maxConnections)
        config.bounds.maxBacklogBytes = maxBacklogBytes.bytes
        config.bounds.memoryBytes = memoryBacklogBytes.bytes
        // Segments small enough that a bounded journal can shrink in steps.
        config.journal.segmentBytes = max(1 << 20, min(64 << 20, maxBacklogBytes.bytes / 16))

        let notifier = SystemdNotifier(environment: environment)
        let (ready, readyContinuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        let daemon = Daemon(configuration: config, logger: logger) { _ in readyContinuation.yield() }
        let supervisor = SystemdSupervisor(daemon: daemon, notifier: notifier, ready: ready, logger: logger)
        // Shutdown runs in reverse order: the supervisor says STOPPING=1 before the daemon drains.
        let group = ServiceGroup(services: [daemon, supervisor], gracefulShutdownSignals: [.sigterm, .sigint], cancellationSignals: [], logger: logger)
        do {
            try await group.run()
        } catch let error as DaemonStartError {
            logger.critical("\(error.description)")
            throw ExitCode(error.isAlreadyRunning ? 2 : 1)
        }
    }
}

extension DaemonStartError {
    var isAlreadyRunning: Bool { if case .alreadyRunning = self { true } else { false } }
}

/// An on/off setting.
enum Toggle: String, ExpressibleByArgument, CaseIterable {
    case on, off
}

/// A size in bytes, written as a number with an optional K, M or G suffix (powers of 1024).
struct ByteCount: ExpressibleByArgument {
    var bytes: Int

    init(_ bytes: Int) { self.bytes = bytes }

    init?(argument: String) {
        let units: [Character: Int] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30]
        var text = argument.uppercased()
        if text.hasSuffix("B") { text.removeLast() }
        var multiplier = 1
        if let last = text.last, let unit = units[last] {
            multiplier = unit
            text.removeLast()
        }
        guard let value = Int(text), value > 0 else { return nil }
        bytes = value * multiplier
    }

    var defaultValueDescription: String {
        bytes % (1 << 30) == 0 ? "\(bytes >> 30)G" : "\(bytes >> 20)M"
    }
}
