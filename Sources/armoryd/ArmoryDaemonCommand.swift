#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import ArmoryDaemon
import ArmoryProtocol
import Foundation
import Logging
import ServiceLifecycle

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

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical. Default: $ARMORY_LOG_LEVEL, else info.")
    var logLevel: String?

    func run() async throws {
        let environment = ProcessInfo.processInfo.environment
        let levelName = logLevel ?? environment["ARMORY_LOG_LEVEL"] ?? "info"
        guard let level = Logger.Level(rawValue: levelName) else {
            throw ValidationError("Unknown log level '\(levelName)': use trace, debug, info, notice, warning, error or critical.")
        }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "armoryd")

        guard let socketPath = SocketDiscovery.daemonPath(flag: socket, environment: environment, isRoot: getuid() == 0) else {
            throw ValidationError("No socket path: XDG_RUNTIME_DIR is not set. Pass --socket PATH or set ARMORY_SOCKET.")
        }
        guard maxFrameBytes >= 1024 else { throw ValidationError("--max-frame-bytes must be at least 1024.") }
        let armoryHome = home ?? environment["ARMORY_HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? (NSHomeDirectory() + "/.armory")
        let absoluteHome = armoryHome.hasPrefix("/") ? armoryHome : FileManager.default.currentDirectoryPath + "/" + armoryHome

        var config = DaemonConfiguration(socketPath: socketPath, storeRoot: absoluteHome + "/mlruns", stateDirectory: absoluteHome + "/state")
        config.limits.maxFrameBytes = maxFrameBytes
        config.orphanGraceSeconds = orphanGrace
        config.shutdownDrainSeconds = shutdownDrain

        let daemon = Daemon(configuration: config, logger: logger)
        let group = ServiceGroup(services: [daemon], gracefulShutdownSignals: [.sigterm, .sigint], cancellationSignals: [], logger: logger)
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
