import ArmoryProtocol
import Foundation
import MLflow

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// One destination's write-ahead journal: append-only segment files of CRC-framed records,
/// written by a committer thread that fsyncs by group commit (at most every `commitInterval`,
/// at once when a flush asks). A segment is deleted once everything in it is settled; each new
/// segment starts with a snapshot of the live runs, so no older one is needed to replay it.
public final class Journal: @unchecked Sendable {
    /// How the journal commits.
    public struct Options: Sendable {
        /// Longest wait before appended records are written and fsynced (the group commit).
        public var commitInterval: Double = 0.05
        /// `false` writes without fsync: survives a daemon crash, not a power cut (for measuring).
        public var fsync: Bool = true
        /// Size past which a new segment starts.
        public var segmentBytes: Int = 64 << 20
        /// How often the sender records the settled watermark (after making what its sink wrote
        /// durable: `recordSettled`).
        public var settleInterval: Double = 1

        public init(commitInterval: Double = 0.05, fsync: Bool = true, segmentBytes: Int = 64 << 20, settleInterval: Double = 1) {
            self.commitInterval = commitInterval
            self.fsync = fsync
            self.segmentBytes = segmentBytes
            self.settleInterval = settleInterval
        }
    }

    /// What opening an existing journal found.
    public struct Recovery: Sendable {
        public var state = JournalState(collectPending: true)
        public var segments = 0
        public var bytes = 0
        public var corruptRecords = 0
        public var truncatedBytes = 0
        public var seconds = 0.0
    }

    /// Figures for `status`.
    public struct Statistics: Sendable, Equatable {
        public var segments = 0
        public var bytes = 0
        public var appendedLSN: UInt64 = 0
        public var durableLSN: UInt64 = 0
        public var settledLSN: UInt64 = 0
        public var corruptRecords = 0
        public var lastError: String?
    }

    private struct Segment {
        var id: UInt64
        var path: String
        var maxLSN: UInt64
        var bytes: Int
    }

    public let directory: String
    public let options: Options
    private let condition = NSCondition()

    // Guarded by `condition`.
    private var buffer: [UInt8] = []
    private var bufferMaxLSN: UInt64 = 0
    private var nextLSN: UInt64
    private var durableLSN: UInt64
    private var settledLSN: UInt64
    private var settledWritten: UInt64
    /// The watermark to record at the next commit (what the sink has made durable).
    private var settledToRecord: UInt64
    private var urgent = false
    private var closing = false
    private var closed = false
    private var waiters: [(lsn: UInt64, callback: @Sendable () -> Void)] = []
    private var state: JournalState
    private var segments: [Segment]
    private var statistics: Statistics

    /// Called once, the next time the settled watermark moves or segments are deleted.
    private var progressWaiters: [@Sendable () -> Void] = []

    // Owned by the committer thread.
    private var fd: Int32 = -1
    private var thread: Thread?

    /// Opens (creating if needed) the journal in `directory` and replays it: torn tails are cut
    /// off, corrupt records skipped and counted.
    /// At most about `replayBytes` of unsettled records are read into memory; the rest stay on
    /// disk for the uploader to read back.
    public static func open(directory: String, options: Options = Options(), replayBytes: Int = 64 << 20) throws -> (Journal, Recovery) {
        let started = Date()
        try Directories.create(directory, mode: 0o700)
        var recovery = Recovery()
        recovery.state = JournalState(collectPending: true, pendingBudget: replayBytes)
        var segments: [Segment] = []
        for name in try FileManager.default.contentsOfDirectory(atPath: directory).sorted() {
            guard let id = segmentID(name) else { continue }
            let path = directory + "/" + name
            guard let bytes = FileManager.default.contents(atPath: path).map(Array.init) else { continue }
            var maxLSN: UInt64 = 0
            let scan = JournalSegment.scan(bytes) { lsn, entry in
                recovery.state.apply(entry, lsn: lsn)
                maxLSN = max(maxLSN, lsn)
            }
            recovery.corruptRecords += scan.corrupt
            if scan.tornBytes > 0 {
                recovery.truncatedBytes += scan.tornBytes
                if scan.validLength < JournalSegment.magic.count {
                    unlink(path)
                    continue
                }
                truncate(path, off_t(scan.validLength))
            }
            segments.append(Segment(id: id, path: path, maxLSN: maxLSN, bytes: scan.validLength))
            recovery.bytes += scan.validLength
        }
        recovery.segments = segments.count
        recovery.seconds = Date().timeIntervalSince(started)
        let journal = Journal(directory: directory, options: options, recovered: recovery.state, segments: segments)
        journal.statistics.corruptRecords = recovery.corruptRecords
        try journal.startSegment()
        journal.thread = Thread { journal.commitLoop() }
        journal.thread?.name = "armoryd-journal"
        journal.thread?.start()
        return (journal, recovery)
    }

    private init(directory: String, options: Options, recovered: JournalState, segments: [Segment]) {
        self.directory = directory
        self.options = options
        self.state = recovered.live
        self.segments = segments
        self.nextLSN = recovered.highestLSN + 1
        self.durableLSN = recovered.highestLSN
        self.settledLSN = recovered.settled
        self.settledWritten = recovered.settled
        self.settledToRecord = recovered.settled
        self.statistics = Statistics()
    }

    private static func segmentID(_ name: String) -> UInt64? {
        guard name.hasPrefix("segment-"), name.hasSuffix(".log") else { return nil }
        return UInt64(name.dropFirst(8).dropLast(4), radix: 16)
    }

    /// Opens a fresh segment headed by the live runs (the committer's job, or `open`'s).
    private func startSegment() throws {
        let id = (segments.last?.id ?? 0) + 1
        let path = directory + "/" + "segment-" + String(format: "%016llx", id) + ".log"
        let newFD = Glibc.open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0o600)
        guard newFD >= 0 else { throw JournalError.io("cannot create \(path): \(String(cString: strerror(errno)))") }
        var head = JournalSegment.magic
        condition.lock()
        let snapshot = state.snapshot()
        condition.unlock()
        for entry in snapshot {
            var w = JournalFieldWriter()
            JournalCodec.encode(entry, into: &w)
            JournalSegment.frame(lsn: 0, body: w.bytes, into: &head)
        }
        try Self.writeAll(newFD, head)
        if options.fsync { fsync(newFD) }
        if fd >= 0 { Glibc.close(fd) }
        fd = newFD
        Self.syncDirectory(directory)
        condition.lock()
        segments.append(Segment(id: id, path: path, maxLSN: 0, bytes: head.count))
        condition.unlock()
    }

    // MARK: Producers

    /// What `append` did.
    public struct Appended: Sendable {
        /// The entry's sequence number.
        public var lsn: UInt64
        /// Its size in the journal.
        public var bytes: Int
        /// The journal's size on disk and in its buffer, this entry included.
        public var journalBytes: Int
    }

    /// Appends an entry. Durable once `whenDurable` says so.
    @discardableResult
    public func append(_ entry: JournalEntry) -> Appended {
        append(entry, encoded: Self.encode(entry))
    }

    /// An entry's encoded body (done before taking any lock).
    public static func encode(_ entry: JournalEntry) -> [UInt8] {
        var w = JournalFieldWriter()
        JournalCodec.encode(entry, into: &w)
        return w.bytes
    }

    /// Appends an entry already encoded with `encode`.
    @discardableResult
    public func append(_ entry: JournalEntry, encoded body: [UInt8]) -> Appended {
        append([(entry, body)])[0]
    }

    /// Appends entries already encoded with `encode`, in order, under one acquisition of the lock.
    public func append(_ entries: [(entry: JournalEntry, body: [UInt8])]) -> [Appended] {
        condition.lock()
        defer { condition.unlock() }
        let wasEmpty = buffer.isEmpty
        let onDisk = segmentBytesTotal
        var out: [Appended] = []
        out.reserveCapacity(entries.count)
        for (entry, body) in entries {
            let lsn = nextLSN
            nextLSN += 1
            let before = buffer.count
            JournalSegment.frame(lsn: lsn, body: body, into: &buffer)
            bufferMaxLSN = lsn
            state.apply(entry, lsn: lsn)
            out.append(Appended(lsn: lsn, bytes: buffer.count - before, journalBytes: onDisk + buffer.count))
        }
        if wasEmpty && !buffer.isEmpty { condition.signal() }
        return out
    }

    /// The journal's size on disk (whole segments) and in its buffer.
    public var diskBytes: Int {
        condition.lock()
        defer { condition.unlock() }
        return segmentBytesTotal + buffer.count
    }

    private var segmentBytesTotal: Int { segments.reduce(0) { $0 + $1.bytes } }

    /// Where reading back records stopped (a segment and an offset in it).
    public struct Position: Sendable, Equatable {
        var segment: UInt64
        var offset: Int
    }

    /// Reads back records (not state entries) with sequence numbers after `after` and up to
    /// `through`, from what is on disk, starting at `position` (else the oldest segment), until
    /// about `maxBytes` were read. Returns them and where to go on.
    public func records(from position: Position?, after: UInt64, through: UInt64, maxBytes: Int) -> (records: [JournalState.Pending], next: Position?) {
        condition.lock()
        let files = segments.map { (id: $0.id, path: $0.path, bytes: $0.bytes) }
        condition.unlock()
        guard var index = files.firstIndex(where: { $0.id >= (position?.segment ?? 0) }) else { return ([], position) }
        var offset = position.flatMap { $0.segment == files[index].id ? $0.offset : nil } ?? JournalSegment.magic.count
        var out: [JournalState.Pending] = []
        var read = 0
        while index < files.count, read < maxBytes {
            let file = files[index]
            if offset >= file.bytes {
                guard index + 1 < files.count else { break }
                index += 1
                offset = JournalSegment.magic.count
                continue
            }
            let fd = Glibc.open(file.path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { break }
            var want = min(file.bytes - offset, max(maxBytes - read, 64 << 10))
            var chunk: [UInt8] = []
            var n = 0
            while true {
                chunk = [UInt8](repeating: 0, count: want)
                n = chunk.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(offset)) }
                guard n >= JournalSegment.recordHeader else { break }
                let length = JournalSegment.recordHeader + Int(UInt32(littleEndian: chunk.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }))
                // One record larger than the chunk: read exactly its length.
                if length > n, length <= file.bytes - offset, length > want {
                    want = length
                    continue
                }
                break
            }
            Glibc.close(fd)
            guard n > 0 else { break }
            var consumed = 0
            var stop = false
            chunk.withUnsafeBytes { raw in
                while n - consumed >= JournalSegment.recordHeader {
                    let length = Int(UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: consumed, as: UInt32.self)))
                    guard length >= 9, length <= JournalSegment.maxRecordBytes else {
                        stop = true
                        return
                    }
                    guard n - consumed - JournalSegment.recordHeader >= length else { return }  // read it whole next time
                    let body = UnsafeRawBufferPointer(rebasing: raw[(consumed + JournalSegment.recordHeader)..<(consumed + JournalSegment.recordHeader + length)])
                    var reader = JournalFieldReader(body)
                    guard let lsn = try? reader.u64() else {
                        consumed += JournalSegment.recordHeader + length
                        continue
                    }
                    if lsn > through {
                        stop = true
                        return
                    }
                    consumed += JournalSegment.recordHeader + length
                    guard lsn > after else { continue }
                    if case .record(let handle, let record)? = try? JournalCodec.decode(&reader) {
                        out.append(JournalState.Pending(lsn: lsn, handle: handle, record: record))
                    }
                }
            }
            offset += consumed
            read += consumed
            if stop || consumed == 0 { break }
        }
        return (out, Position(segment: files[min(index, files.count - 1)].id, offset: offset))
    }

    /// Every record up to `lsn` is settled by the sink (in memory: what fair shares weigh;
    /// `recordSettled` writes it down).
    public func settle(upTo lsn: UInt64) {
        condition.lock()
        var ready: [@Sendable () -> Void] = []
        if lsn > settledLSN {
            settledLSN = lsn
            swap(&ready, &progressWaiters)
        }
        condition.unlock()
        for callback in ready { callback() }
    }

    /// Records at the next commit that everything up to `lsn` is settled: a restart replays
    /// nothing up to there, and segments behind it are deleted. The caller has made what the sink
    /// wrote up to there durable first.
    public func recordSettled(upTo lsn: UInt64) {
        settle(upTo: lsn)
        condition.lock()
        if lsn > settledToRecord {
            settledToRecord = lsn
            condition.signal()
        }
        condition.unlock()
    }

    /// Every record up to this one is settled (in memory; recorded by `recordSettled`).
    public var settledSequence: UInt64 {
        condition.lock()
        defer { condition.unlock() }
        return settledLSN
    }

    /// Calls `callback` once, when the settled watermark has moved past `lsn` or segments were
    /// deleted (what a paused producer waits for).
    public func whenSettledOrReclaimed(after lsn: UInt64, _ callback: @escaping @Sendable () -> Void) {
        condition.lock()
        let now = settledLSN > lsn
        if !now { progressWaiters.append(callback) }
        condition.unlock()
        if now { callback() }
    }

    /// The highest sequence number appended so far.
    public var appendedLSN: UInt64 {
        condition.lock()
        defer { condition.unlock() }
        return nextLSN - 1
    }

    /// Every entry up to this sequence number is on disk.
    public var durableSequence: UInt64 {
        condition.lock()
        defer { condition.unlock() }
        return durableLSN
    }

    public func isDurable(_ lsn: UInt64) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        return lsn <= durableLSN
    }

    /// Calls `callback` (on the committer thread) once `lsn` is fsynced; asks for a commit now
    /// when `urgent` (a flush), else it comes with the next group commit.
    public func whenDurable(_ lsn: UInt64, urgent: Bool = false, _ callback: @escaping @Sendable () -> Void) {
        condition.lock()
        if lsn <= durableLSN || closed {
            condition.unlock()
            callback()
            return
        }
        waiters.append((lsn, callback))
        if urgent { self.urgent = true }
        condition.signal()
        condition.unlock()
    }

    public var snapshotStatistics: Statistics {
        condition.lock()
        defer { condition.unlock() }
        var s = statistics
        s.segments = segments.count
        s.bytes = segmentBytesTotal + buffer.count
        s.appendedLSN = nextLSN - 1
        s.durableLSN = durableLSN
        s.settledLSN = settledLSN
        return s
    }

    /// Writes and fsyncs what is buffered, records the watermark, stops the committer.
    public func close() {
        condition.lock()
        closing = true
        condition.signal()
        while !closed { condition.wait() }
        condition.unlock()
    }

    // MARK: The committer

    private func commitLoop() {
        var lastCommit = 0.0
        // Two buffers taking turns: producers fill one while the other is written, and neither
        // is allocated again once grown.
        var bytes: [UInt8] = []
        while true {
            condition.lock()
            while buffer.isEmpty && waiters.isEmpty && !closing && settledToRecord <= settledWritten {
                condition.wait()
            }
            // Group commit: let more records join until the interval since the last commit is over.
            while !urgent && !closing {
                let wait = lastCommit + options.commitInterval - Self.now()
                if wait <= 0 { break }
                _ = condition.wait(until: Date(timeIntervalSinceNow: wait))
            }
            let settleTo = settledToRecord
            condition.unlock()

            if settleTo > settledWritten {
                condition.lock()
                var w = JournalFieldWriter()
                JournalCodec.encode(.settled(settleTo), into: &w)
                let lsn = nextLSN
                nextLSN += 1
                JournalSegment.frame(lsn: lsn, body: w.bytes, into: &buffer)
                bufferMaxLSN = lsn
                state.apply(.settled(settleTo), lsn: lsn)
                condition.unlock()
            }

            condition.lock()
            bytes.removeAll(keepingCapacity: true)
            swap(&bytes, &buffer)
            let upTo = bufferMaxLSN
            urgent = false
            let stop = closing
            condition.unlock()

            var failure: String?
            if !bytes.isEmpty {
                do {
                    try Self.writeAll(fd, bytes)
                    if options.fsync, fdatasync(fd) != 0 {
                        throw JournalError.io("journal fsync failed: \(String(cString: strerror(errno)))")
                    }
                } catch {
                    failure = "\(error)"
                }
            }
            lastCommit = Self.now()

            condition.lock()
            if let failure {
                // Nothing is acknowledged: cut the partial write off, keep the bytes, try again.
                statistics.lastError = failure
                ftruncate(fd, off_t(segments[segments.count - 1].bytes))
                buffer.insert(contentsOf: bytes, at: 0)
                condition.unlock()
                Thread.sleep(forTimeInterval: stop ? 0 : 0.5)
                if !stop { continue }
                condition.lock()
            }
            if !bytes.isEmpty && failure == nil {
                durableLSN = max(durableLSN, upTo)
                segments[segments.count - 1].maxLSN = upTo
                segments[segments.count - 1].bytes += bytes.count
            }
            if settleTo > settledWritten { settledWritten = settleTo }
            var ready: [@Sendable () -> Void] = []
            waiters.removeAll { w in
                guard w.lsn <= durableLSN || stop else { return false }
                ready.append(w.callback)
                return true
            }
            // Whole segments behind the recorded watermark are no longer needed.
            var obsolete: [String] = []
            while segments.count > 1, segments[0].maxLSN <= settledWritten {
                obsolete.append(segments.removeFirst().path)
            }
            let rotate = (segments.last?.bytes ?? 0) >= options.segmentBytes
            if rotate { state.prune() }
            var reclaimed: [@Sendable () -> Void] = []
            if !obsolete.isEmpty { swap(&reclaimed, &progressWaiters) }
            condition.unlock()

            for path in obsolete { unlink(path) }
            for callback in reclaimed { callback() }
            for callback in ready { callback() }
            if rotate && !stop {
                do { try startSegment() } catch {
                    condition.lock()
                    statistics.lastError = "\(error)"
                    condition.unlock()
                }
            }
            if stop {
                Glibc.close(fd)
                condition.lock()
                closed = true
                condition.broadcast()
                condition.unlock()
                return
            }
        }
    }

    private static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    private static func writeAll(_ fd: Int32, _ bytes: [UInt8]) throws {
        if let failure = FileWrites.writeAll(fd, bytes) { throw JournalError.io("journal write failed: \(failure)") }
    }

    private static func syncDirectory(_ path: String) {
        let dfd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard dfd >= 0 else { return }
        fsync(dfd)
        Glibc.close(dfd)
    }
}

/// A journal file operation failed.
public enum JournalError: Error, CustomStringConvertible {
    case io(String)

    public var description: String {
        switch self {
        case .io(let message): message
        }
    }
}
