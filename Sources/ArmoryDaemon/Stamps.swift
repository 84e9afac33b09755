import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// This daemon's version (hello's reply, `status`, the log).
public enum DaemonVersion {
    public static let current = "0.1.0"
}

/// The ids the daemon gives runs: every part of the pipeline may stamp records with them.
public enum RunIDs {
    /// A fresh MLflow-style run id: 32 lowercase hex characters.
    public static func newRunID() -> String {
        UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "")
    }

    /// A fresh daemon handle for a run: unique across restarts.
    public static func newHandle() -> String {
        "h" + String(newRunID().prefix(20))
    }
}

/// Wall-clock time as MLflow records it.
public enum WallClock {
    /// Milliseconds since the Unix epoch.
    public static func nowMs() -> Int64 { Int64(Date().timeIntervalSince1970 * 1000) }
}

/// Monotonic time, for timers and backoff (never recorded).
public enum MonotonicClock {
    /// Nanoseconds since an arbitrary point (boot).
    public static func nowNs() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}
