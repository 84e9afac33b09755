import ArmoryDaemon
import Foundation
import Logging
import ServiceLifecycle
import Systemd

/// Tells systemd how the daemon is: `READY=1` once the socket accepts, `STATUS=` kept current,
/// `WATCHDOG=1` only after a health check of the event loops and uploaders passed, `STOPPING=1`
/// when shutdown begins. Without `$NOTIFY_SOCKET` it only waits for shutdown.
struct SystemdSupervisor: Service {
    let daemon: Daemon
    let notifier: SystemdNotifier
    let ready: AsyncStream<Void>
    let logger: Logger

    func run() async throws {
        guard notifier.isActive else {
            try? await gracefulShutdown()
            return
        }
        for await _ in ready.cancelOnGracefulShutdown() { break }
        guard !Task.isShuttingDownGracefully else { return stop() }
        notifier.ready(status: daemon.statusLine)
        // Pings at half the watchdog interval (systemd's advice); the status line every 5 s otherwise.
        let period = notifier.watchdogInterval.map { $0 / 2 } ?? .seconds(5)
        let checkBound = min(1, period.seconds / 2)
        var lastStatus = ""
        var unhealthy = false
        while !Task.isShuttingDownGracefully {
            if let interval = notifier.watchdogInterval {
                let problems = await daemon.healthProblems(within: checkBound)
                if problems.isEmpty {
                    notifier.watchdog()
                    if unhealthy { logger.notice("health check passes again: watchdog pings resume") }
                    unhealthy = false
                } else if !unhealthy {
                    unhealthy = true
                    logger.error(
                        "health check failed: watchdog pings stop; systemd restarts armoryd after WatchdogSec",
                        metadata: [
                            "problems": "\(problems.joined(separator: "; "))", "watchdog_s": "\(interval.seconds)",
                        ])
                }
            }
            let status = unhealthy ? "unhealthy (watchdog pings stopped): " + daemon.statusLine : daemon.statusLine
            if status != lastStatus {
                notifier.status(status)
                lastStatus = status
            }
            try? await cancelWhenGracefulShutdown { try await EventLoopClock.sleep(for: period) }
        }
        stop()
    }

    private func stop() {
        notifier.stopping(status: "stopping: draining queued records")
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
