import Foundation
import Logging
import ServiceLifecycle
import Systemd
import UnixSignals

/// `systemctl reload armoryd` (SIGHUP): reads the configuration and the credentials file again.
/// The log level and credentials apply at once; other changed settings are named as taking effect at the next restart; a configuration
/// that no longer validates is reported and the running one kept.
struct ConfigurationReloader: Service {
    let notifier: SystemdNotifier
    let logger: Logger
    let applied: [SettingsResolver.Resolved]
    let reloadCredentials: @Sendable () -> [String]
    let resolve: @Sendable () async throws -> ArmoryDaemonCommand.Resolution

    init(
        notifier: SystemdNotifier, logger: Logger, applied: [SettingsResolver.Resolved], reloadCredentials: @escaping @Sendable () -> [String],
        resolve: @escaping @Sendable () async throws -> ArmoryDaemonCommand.Resolution
    ) {
        self.notifier = notifier
        self.logger = logger
        self.applied = applied
        self.reloadCredentials = reloadCredentials
        self.resolve = resolve
    }

    func run() async throws {
        var current = applied
        for await _ in await UnixSignalsSequence(trapping: .sighup).cancelOnGracefulShutdown() {
            notifier.reloading()
            let rotated = reloadCredentials()
            if !rotated.isEmpty { logger.notice("credentials reloaded", metadata: ["servers": "\(rotated.joined(separator: ", "))"]) }
            do {
                let next = try await resolve()
                LogLevelControl.shared.level = next.logLevel
                let changed = next.settings.resolved.filter { setting in
                    setting.key != "log-level" && current.first { $0.key == setting.key }?.value != setting.value
                }
                for setting in changed {
                    logger.warning(
                        "setting changed: takes effect at the next restart",
                        metadata: [
                            "setting": "\(setting.key)", "value": "\(setting.value)", "source": "\(setting.source)",
                        ])
                }
                logger.notice("configuration reloaded", metadata: ["log_level": "\(next.logLevel)", "file": "\(next.settings.filePath ?? "none")"])
                current = next.settings.resolved
            } catch {
                logger.error("configuration not reloaded: the running one is kept", metadata: ["error": "\(error)"])
            }
            notifier.ready()
        }
    }
}
