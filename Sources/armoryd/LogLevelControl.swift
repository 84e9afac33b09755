import Logging
import Synchronization

/// The daemon's log level, changed at run time by a configuration reload: every handler reads it.
final class LogLevelControl: Sendable {
    static let shared = LogLevelControl()

    private let current = Atomic<UInt8>(2)

    var level: Logger.Level {
        get { Logger.Level.allCases[Int(current.load(ordering: .relaxed))] }
        set { current.store(UInt8(Logger.Level.allCases.firstIndex(of: newValue)!), ordering: .relaxed) }
    }

    /// `inner`, with its level following this control's.
    func handler(_ inner: some LogHandler) -> any LogHandler { ControlledLogHandler(inner: inner, control: self) }
}

/// A handler whose level is the control's (a level set on the handler itself is ignored).
struct ControlledLogHandler<Inner: LogHandler>: LogHandler {
    var inner: Inner
    let control: LogLevelControl

    var logLevel: Logger.Level {
        get { control.level }
        set {}
    }

    var metadata: Logger.Metadata {
        get { inner.metadata }
        set { inner.metadata = newValue }
    }

    var metadataProvider: Logger.MetadataProvider? {
        get { inner.metadataProvider }
        set { inner.metadataProvider = newValue }
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { inner[metadataKey: key] }
        set { inner[metadataKey: key] = newValue }
    }

    func log(event: LogEvent) {
        var inner = inner
        inner.logLevel = .trace  // the control already decided
        inner.log(event: event)
    }
}
