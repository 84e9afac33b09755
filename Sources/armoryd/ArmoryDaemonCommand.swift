import ArgumentParser
import ArmoryDaemon
import ArmoryProtocol
import Foundation
import Logging
import MLflow
import ServiceLifecycle
import Systemd

#if canImport(Glibc)
    import Glibc
#endif

/// `armoryd`: the per-host tracking daemon (started by `main.swift`).
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
        version: DaemonVersion.current)

    @Option(help: "Configuration file (YAML; keys are these flags' names). Default: /etc/armory/armoryd.conf for root, else $XDG_CONFIG_HOME/armory/armoryd.conf; a missing default file is fine.")
    var config: String?

    @Flag(help: "Check the configuration (file, environment, flags), print each setting with where it came from, and exit: 0 valid, 1 not.")
    var checkConfig = false

    @Option(help: "Unix socket to listen on. Default: $XDG_RUNTIME_DIR/armory/armoryd.sock (/run/armory/armoryd.sock for root).")
    var socket: String?

    @Option(help: "Armory home: the store is <home>/mlruns, daemon state <home>/state. Default: ~/.armory.")
    var home: String?

    @Option(help: "Largest frame accepted, in bytes (default 8388608).")
    var maxFrameBytes: Int?

    @Option(help: "Seconds the runs of a vanished client wait for a reattach before they end FAILED (default 60).")
    var orphanGrace: Double?

    @Option(help: "Seconds SIGTERM waits for queued records to reach the store (default 30).")
    var shutdownDrain: Double?

    @Option(help: "MLflow tracking server (http(s)://…) or local store (file:///…) to write to (null: journals records, then discards them: for benchmarks). Default: $MLFLOW_TRACKING_URI, else <home>/mlruns.")
    var trackingURI: String?

    @Option(help: "Requests in flight at once to an MLflow server (default 4).")
    var uploadConcurrency: Int?

    @Option(help: "Seconds metrics wait for a fuller batch before they are sent to an MLflow server (default 1).")
    var flushInterval: Double?

    @Option(help: "Seconds one request to the MLflow server may take (default 30).")
    var requestTimeout: Double?

    @Option(help: "Milliseconds the journal's group commit waits for more records before it fsyncs (default 50; a flush commits at once).")
    var journalCommitMs: Double?

    @Option(help: "Whether the journal fsyncs (default on): 'off' survives a daemon crash but not a power cut (for measuring only).")
    var journalFsync: Toggle?

    @Option(help: "Largest journal backlog on disk (bytes; K, M, G suffixes) before clients are slowed down until the destination catches up (default 8G).")
    var maxBacklogBytes: ByteCount?

    @Option(help: "Bytes of queued records each destination keeps in memory; the rest of the backlog waits in the journal on disk (default 16M).")
    var memoryBacklogBytes: ByteCount?

    @Option(help: "Mode of the socket file, in octal (default 600): 600 lets only this user in, 660 its group too.")
    var socketMode: String?

    @Option(help: "Connections served at once (default 1024).")
    var maxConnections: Int?

    @Option(help: "MLflow servers or stores one user may name besides the daemon's own destination, each with a journal of its own (default 4).")
    var maxDestinationsPerUser: Int?

    @Option(help: "Group whose members, like root and the daemon's user, see every user's runs in status and every dead letter (default armory-admin).")
    var adminGroup: String?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical (default info).")
    var logLevel: String?

    @Option(help: "Seconds between the samples of system metrics (system/...) logged to every active run (default 10; 0: none).")
    var systemMetricsInterval: Double?

    /// The daemon's configuration and log level, from flags, environment, file and defaults.
    struct Resolution {
        var configuration: DaemonConfiguration
        var logLevel: Logger.Level
        var settings: SettingsResolver
    }

    func run() async throws {
        let environment = ProcessInfo.processInfo.environment
        // Socket activation: systemd passes the listening socket; armoryd serves it as is.
        let activated = checkConfig ? [] : SocketActivation.listeningSockets()
        let adopted = activated.first { $0.name == "armoryd" } ?? activated.first
        if let adopted, !SocketActivation.isListeningUnixStream(adopted.descriptor) {
            throw ValidationError("systemd passed socket '\(adopted.name)' (fd \(adopted.descriptor)), which is not a listening Unix stream socket: set ListenStream=/path in armoryd.socket.")
        }
        let resolution = try await resolve(environment: environment, adopted: adopted)
        if checkConfig {
            print(resolution.settings.report)
            print("configuration is valid")
            return
        }
        // Under systemd, stderr is the journal: structured entries instead of plain lines.
        let toJournal = JournalLogHandler.stderrIsJournal(environment: environment)
        LogLevelControl.shared.level = resolution.logLevel
        LoggingSystem.bootstrap { label in
            toJournal
                ? LogLevelControl.shared.handler(JournalLogHandler(label: label))
                : LogLevelControl.shared.handler(StreamLogHandler.standardError(label: label))
        }
        let logger = Logger(label: "armoryd")
        let notifier = SystemdNotifier(environment: environment)
        let (ready, readyContinuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        let daemon = Daemon(configuration: resolution.configuration, logger: logger) { _ in readyContinuation.yield() }
        let supervisor = SystemdSupervisor(daemon: daemon, notifier: notifier, ready: ready, logger: logger)
        let reloader = ConfigurationReloader(notifier: notifier, logger: logger, applied: resolution.settings.resolved, reloadCredentials: daemon.reloadCredentials) { [self] in
            try await resolve(environment: ProcessInfo.processInfo.environment, adopted: adopted)
        }
        // Shutdown runs in reverse order: the supervisor says STOPPING=1 before the daemon drains.
        let group = ServiceGroup(services: [daemon, reloader, supervisor], gracefulShutdownSignals: [.sigterm, .sigint], cancellationSignals: [], logger: logger)
        do {
            try await group.run()
        } catch let error as DaemonStartError {
            logger.critical("\(error.description)")
            throw ExitCode(error.isAlreadyRunning ? 2 : 1)
        }
    }

    func resolve(environment: [String: String], adopted: SocketActivation.ListeningSocket?) async throws -> Resolution {
        let isRoot = getuid() == 0
        var settings = try await SettingsResolver.open(explicit: config, environment: environment, isRoot: isRoot)
        if let logLevel, Logger.Level(rawValue: logLevel) == nil {
            throw ConfigurationError("Unknown log level '\(logLevel)': use trace, debug, info, notice, warning, error or critical.")
        }
        let level = try settings.value(
            "log-level", flag: logLevel.flatMap(Logger.Level.init(rawValue:)), default: Logger.Level.info,
            what: "a log level (trace, debug, info, notice, warning, error, critical)"
        ) { Logger.Level(rawValue: $0) }
        // docs/architecture.md, "Finding the daemon": --socket, else $ARMORY_SOCKET, else the socket systemd passed, else
        // the file's, else the per-user or system default.
        let adoptedPath = adopted.map { SocketActivation.boundPath($0.descriptor) ?? "fd \($0.descriptor)" }
        let useAdopted = socket == nil && (environment["ARMORY_SOCKET"] ?? "").isEmpty && adoptedPath != nil
        let configuredSocket =
            useAdopted
            ? settings.record("socket", adoptedPath!, source: "socket passed by systemd")
            : try settings.value("socket", flag: socket, default: nil, what: "a socket path") { $0.isEmpty ? nil : $0 }
        guard let socketPath = configuredSocket ?? SocketDiscovery.daemonPath(flag: nil, environment: environment, isRoot: isRoot) else {
            throw ConfigurationError("No socket path: XDG_RUNTIME_DIR is not set. Pass --socket PATH or set ARMORY_SOCKET.")
        }
        let maxFrameBytes = try settings.value(
            "max-frame-bytes", flag: maxFrameBytes, default: ProtocolLimits.default.maxFrameBytes,
            what: "a byte count of at least 1024"
        ) { Int($0).flatMap { $0 >= 1024 ? $0 : nil } }
        guard maxFrameBytes >= 1024 else { throw ConfigurationError("--max-frame-bytes must be at least 1024.") }
        let armoryHome = try settings.value("home", flag: home, default: NSHomeDirectory() + "/.armory", what: "a directory") { $0.isEmpty ? nil : $0 }
        let absoluteHome = armoryHome.hasPrefix("/") ? armoryHome : FileManager.default.currentDirectoryPath + "/" + armoryHome

        var config = DaemonConfiguration(socketPath: socketPath, storeRoot: absoluteHome + "/mlruns", stateDirectory: absoluteHome + "/state")
        // The system daemon's (user armory, or root) is /etc/armory/credentials, readable by it alone;
        // any daemon also reads <home>/credentials. A file this daemon cannot read is skipped.
        config.credentialsFiles = ["/etc/armory/credentials", absoluteHome + "/credentials"]
        config.adoptedSocket = useAdopted ? adopted?.descriptor : nil
        config.createsSocketDirectory = configuredSocket == nil
        let uri = try settings.value("tracking-uri", flag: trackingURI, default: nil, what: "a tracking URI", also: ["MLFLOW_TRACKING_URI"]) {
            $0.isEmpty ? nil : $0
        }
        if let uri, !uri.hasPrefix("armoryd:") {
            if MLflowDestination.isRemote(uri) {
                config.server = MLflowDestination(
                    trackingURI: uri,
                    credentials: MLflowCredentials.resolve(environment: environment),
                    tls: MLflowTLSSettings.resolve(environment: environment))
            } else if uri == "null:" {
                config.discardsRecords = true
            } else if uri.hasPrefix("file:") || uri.hasPrefix("/") {
                let path = uri.hasPrefix("file://") ? String(uri.dropFirst(7)) : (uri.hasPrefix("file:") ? String(uri.dropFirst(5)) : uri)
                config.storeRoot = path.removingPercentEncoding ?? path
            } else {
                throw ConfigurationError(
                    "Setting 'tracking-uri': unsupported URI '\(MLflowDestination.stripUserInfo(uri))': use http(s)://… for an MLflow server, file:///… for a local store (or null: to discard records after journaling them, for benchmarks).")
            }
        }
        let seconds = "a number of seconds ≥ 0"
        config.uploadConcurrency = try settings.value("upload-concurrency", flag: uploadConcurrency, default: 4, what: "a whole number ≥ 1") {
            Int($0).flatMap { $0 >= 1 ? $0 : nil }
        }
        config.flushInterval = try settings.value("flush-interval", flag: flushInterval, default: 1, what: seconds) { Self.nonNegative($0) }
        config.requestTimeout = try settings.value("request-timeout", flag: requestTimeout, default: 30, what: "a number of seconds > 0") {
            Double($0).flatMap { $0 > 0 ? $0 : nil }
        }
        guard config.uploadConcurrency >= 1, config.flushInterval >= 0, config.requestTimeout > 0 else {
            throw ConfigurationError("--upload-concurrency must be ≥ 1, --flush-interval ≥ 0, --request-timeout > 0.")
        }
        config.limits.maxFrameBytes = maxFrameBytes
        config.systemMetricsInterval = try settings.value("system-metrics-interval", flag: systemMetricsInterval, default: 10, what: seconds) {
            Self.nonNegative($0)
        }
        config.orphanGraceSeconds = try settings.value("orphan-grace", flag: orphanGrace, default: 60, what: seconds) { Self.nonNegative($0) }
        config.shutdownDrainSeconds = try settings.value("shutdown-drain", flag: shutdownDrain, default: 30, what: seconds) { Self.nonNegative($0) }
        config.journal.commitInterval =
            try settings.value("journal-commit-ms", flag: journalCommitMs, default: 50, what: "milliseconds ≥ 0") {
                Self.nonNegative($0)
            } / 1000
        config.journal.fsync = try settings.value("journal-fsync", flag: journalFsync, default: .on, what: "on or off") { Toggle(rawValue: $0) } == .on
        let modeText = try settings.value("socket-mode", flag: socketMode, default: "600", what: "an octal file mode such as 600 or 660") {
            Self.octalMode($0) == nil ? nil : $0
        }
        guard let mode = Self.octalMode(modeText) else {
            throw ConfigurationError("--socket-mode '\(modeText)' is not an octal file mode such as 600 or 660.")
        }
        config.socketMode = mode
        config.maxConnections = try settings.value("max-connections", flag: maxConnections, default: 1024, what: "a whole number ≥ 1") {
            Int($0).flatMap { $0 >= 1 ? $0 : nil }
        }
        config.maxDestinationsPerUser = try settings.value("max-destinations-per-user", flag: maxDestinationsPerUser, default: 4, what: "a whole number ≥ 0") {
            Int($0).flatMap { $0 >= 0 ? $0 : nil }
        }
        guard config.maxDestinationsPerUser >= 0 else { throw ConfigurationError("--max-destinations-per-user must be 0 or more.") }
        config.adminGroup = try settings.value("admin-group", flag: adminGroup, default: "armory-admin", what: "a group name") { $0.isEmpty ? nil : $0 }
        config.bounds.maxBacklogBytes = try settings.value(
            "max-backlog-bytes", flag: maxBacklogBytes, default: ByteCount(8 << 30),
            what: "a size such as 512M or 8G"
        ) { ByteCount(argument: $0) }.bytes
        config.bounds.memoryBytes = try settings.value(
            "memory-backlog-bytes", flag: memoryBacklogBytes, default: ByteCount(16 << 20),
            what: "a size such as 64M"
        ) { ByteCount(argument: $0) }.bytes
        // Segments small enough that a bounded journal can shrink in steps.
        config.journal.segmentBytes = max(1 << 20, min(64 << 20, config.bounds.maxBacklogBytes / 16))

        return Resolution(configuration: config, logLevel: level, settings: settings)
    }

    static func nonNegative(_ text: String) -> Double? { Double(text).flatMap { $0 >= 0 && $0.isFinite ? $0 : nil } }

    static func octalMode(_ text: String) -> mode_t? { mode_t(text, radix: 8).flatMap { $0 <= 0o777 ? $0 : nil } }
}

extension DaemonStartError {
    var isAlreadyRunning: Bool { if case .alreadyRunning = self { true } else { false } }
}

/// An on/off setting.
enum Toggle: String, ExpressibleByArgument, CaseIterable, Sendable {
    case on, off
}

/// A size in bytes, written as a number with an optional K, M or G suffix (powers of 1024).
struct ByteCount: ExpressibleByArgument, Sendable, CustomStringConvertible {
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

    var description: String { defaultValueDescription }

    var defaultValueDescription: String {
        bytes % (1 << 30) == 0 ? "\(bytes >> 30)G" : "\(bytes >> 20)M"
    }
}
