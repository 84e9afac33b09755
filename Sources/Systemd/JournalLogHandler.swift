import CSystemd
import Foundation
import Logging

/// A swift-log handler that writes structured entries to journald (`sd_journal_sendv`): the
/// message, its priority, and each metadata key as a field (`run_id` → `RUN_ID`).
public struct JournalLogHandler: LogHandler {
    public var logLevel: Logger.Level = .info
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    private let label: String

    public init(label: String, metadataProvider: Logger.MetadataProvider? = nil) {
        self.label = label
        self.metadataProvider = metadataProvider
    }

    /// Whether stderr is connected to the journal (`$JOURNAL_STREAM` names stderr's device and
    /// inode), which is when entries should go to journald instead of plain lines.
    public static func stderrIsJournal(environment: [String: String] = ProcessInfo.processInfo.environment) -> Bool {
        guard let stream = environment["JOURNAL_STREAM"] else { return false }
        let parts = stream.split(separator: ":")
        guard parts.count == 2, let device = UInt64(parts[0]), let inode = UInt64(parts[1]) else { return false }
        var info = stat()
        guard fstat(STDERR_FILENO, &info) == 0 else { return false }
        return UInt64(info.st_dev) == device && UInt64(info.st_ino) == inode
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var fields = ["MESSAGE=\(event.message)", "PRIORITY=\(Self.priority(event.level))", "SYSLOG_IDENTIFIER=armoryd", "LOGGER=\(label)"]
        var merged = metadata
        if let provided = metadataProvider?.get() { merged.merge(provided) { $1 } }
        if let extra = event.metadata { merged.merge(extra) { $1 } }
        for (key, value) in merged.sorted(by: { $0.key < $1.key }) {
            fields.append(Self.fieldName(key) + "=" + "\(value)")
        }
        Self.send(fields)
    }

    /// One journal entry: `FIELD=value` strings, copied into one buffer the iovecs point into.
    static func send(_ fields: [String]) {
        let total = fields.reduce(0) { $0 + $1.utf8.count }
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: max(1, total)) { buffer in
            var vectors: [iovec] = []
            vectors.reserveCapacity(fields.count)
            var offset = 0
            for field in fields {
                let count = field.utf8.count
                _ = UnsafeMutableBufferPointer(rebasing: buffer[offset..<offset + count]).initialize(from: field.utf8)
                vectors.append(iovec(iov_base: buffer.baseAddress! + offset, iov_len: count))
                offset += count
            }
            _ = sd_journal_sendv(vectors, Int32(vectors.count))
        }
    }

    /// syslog priorities: journald's `PRIORITY=`.
    static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: 7
        case .info: 6
        case .notice: 5
        case .warning: 4
        case .error: 3
        case .critical: 2
        }
    }

    /// journald field names: upper-case letters, digits and underscores, not starting with one.
    static func fieldName(_ key: String) -> String {
        var name = String(key.uppercased().map { ($0.isLetter || $0.isNumber) && $0.isASCII ? $0 : "_" })
        while name.hasPrefix("_") { name.removeFirst() }
        if name.first?.isNumber ?? true { name = "F" + name }
        return String(name.prefix(64))
    }
}
