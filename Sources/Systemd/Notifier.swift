import CSystemd
import Foundation

/// systemd's notify protocol (`sd_notify`): readiness, status, watchdog pings, stopping and
/// reloading. Every call is a no-op when the service manager set no `$NOTIFY_SOCKET`.
public struct SystemdNotifier: Sendable {
    /// Whether a service manager listens (`$NOTIFY_SOCKET` is set).
    public let isActive: Bool
    /// The watchdog interval the manager expects pings within (`$WATCHDOG_USEC` for this pid).
    public let watchdogInterval: Duration?

    public init(environment: [String: String] = ProcessInfo.processInfo.environment) {
        isActive = !(environment["NOTIFY_SOCKET"] ?? "").isEmpty
        var usec: UInt64 = 0
        // sd_watchdog_enabled checks $WATCHDOG_PID against this process.
        watchdogInterval = sd_watchdog_enabled(0, &usec) > 0 && usec > 0 ? .microseconds(Int64(usec)) : nil
    }

    /// `READY=1` (with an optional one-line status), once the socket accepts connections.
    public func ready(status: String? = nil) { send(["READY=1", status.map { "STATUS=" + Self.oneLine($0) }]) }

    /// `STATUS=`: what `systemctl status` shows.
    public func status(_ text: String) { send(["STATUS=" + Self.oneLine(text)]) }

    /// `WATCHDOG=1`: send only after a real health check passed.
    public func watchdog() { send(["WATCHDOG=1"]) }

    /// `STOPPING=1`, as shutdown begins.
    public func stopping(status: String? = nil) { send(["STOPPING=1", status.map { "STATUS=" + Self.oneLine($0) }]) }

    /// `RELOADING=1` with the monotonic time systemd needs for `Type=notify-reload`, then `READY=1` via `ready()`.
    public func reloading() {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        send(["RELOADING=1", "MONOTONIC_USEC=\(UInt64(now.tv_sec) * 1_000_000 + UInt64(now.tv_nsec) / 1000)"])
    }

    private func send(_ lines: [String?]) {
        guard isActive else { return }
        _ = sd_notify(0, lines.compactMap { $0 }.joined(separator: "\n"))
    }

    static func oneLine(_ text: String) -> String {
        String(text.map { $0.isNewline ? " " : $0 })
    }
}
