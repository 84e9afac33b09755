import ArmoryProtocol

/// One journal record: what the daemon accepted (a record for the sink), what it learned (a run's
/// identity, its MLflow id) and how far the sink got (the settled watermark).
public enum JournalEntry: Sendable, Equatable {
    /// A run as the registry knows it: written when a run is attached, and at the head of every
    /// segment for each run still live, so that older segments can be deleted.
    case run(RunEntry)
    /// A record for the sink (`createRun`, `log`, `updateRun`, `artifact`, `deleteTag`).
    case record(handle: String, SinkRecord)
    /// The run's MLflow id, once the sink created it.
    case bind(handle: String, runID: String, experimentID: String?)
    /// Every record with a sequence number up to this one was applied or refused by the sink.
    case settled(UInt64)
    /// A client session as of a frame (its tracking state, evaluations, chains, replies), written
    /// with that frame's records; at the head of every segment for each live session.
    case session(SessionRecord)
    /// The session's frames up to `seq` are journaled (written after a read burst's records).
    case sessionMark(id: String, seq: UInt64)
    /// The session expired: nobody resumed it within the grace period.
    case sessionEnd(id: String)
}

/// Who produced a record: a client's session, or a sync job copying a store into the destination
/// (docs/architecture.md, "The pipeline"). A record carries it in its run handle: a
/// sync's handles are `sync-<source run id>` (its artifact lanes add `#<n>`), so journals written
/// by every version say it.
public enum RecordOrigin: Sendable, Equatable {
    case client
    case sync

    private static let syncPrefix = "sync-"

    /// The origin of the records of run handle `handle`.
    public init(handle: String) {
        self = handle.hasPrefix(Self.syncPrefix) ? .sync : .client
    }

    /// The handle of a sync's copy of source run `sourceRunID`: the same for every sync of that run.
    public static func syncHandle(_ sourceRunID: String) -> String { syncPrefix + sourceRunID }
}

/// The compact binary form of journal entries (little-endian, length-prefixed strings).
enum JournalCodec {
    enum Kind: UInt8 {
        case run = 1, create, log, update, artifact, bind, settled, deleteTag, session, sessionMark, sessionEnd
    }

    /// Thrown for a record whose body does not decode (its checksum matched: a bug or a
    /// journal from another version).
    struct Malformed: Error {}

    static func encode(_ entry: JournalEntry, into w: inout JournalFieldWriter) {
        switch entry {
        case .run(let e):
            w.u8(Kind.run.rawValue)
            w.string(e.handle)
            w.optional(e.runID)
            w.optional(e.experimentID)
            w.string(e.experimentName)
            w.string(e.name)
            w.u32(e.ownerUID)
            w.u32(UInt32(bitPattern: e.clientPID))
            w.string(e.status.rawValue)
            w.optional(e.parentHandle)
            w.map(e.params)
            w.optionalInt(e.endTime)
        case .record(let handle, .createRun(let c)):
            w.u8(Kind.create.rawValue)
            w.string(handle)
            w.optional(c.runID)
            w.string(c.experimentName)
            w.optional(c.experimentID)
            w.string(c.name)
            w.string(c.userID)
            w.u32(c.ownerUID)
            w.u32(UInt32(bitPattern: c.clientPID))
            w.u64(UInt64(bitPattern: c.startTime))
            w.map(c.tags)
            w.optional(c.parentHandle)
        case .record(let handle, .log(let b)):
            w.u8(Kind.log.rawValue)
            w.string(handle)
            w.u32(UInt32(b.metrics.count))
            for m in b.metrics {
                w.string(m.key)
                w.u64(m.value.bitPattern)
                w.u64(UInt64(bitPattern: m.step))
                w.u64(UInt64(bitPattern: m.timestamp))
            }
            w.map(b.params)
            w.map(b.tags)
        case .record(let handle, .updateRun(let status, let endTime)):
            w.u8(Kind.update.rawValue)
            w.string(handle)
            w.string(status.rawValue)
            w.optionalInt(endTime)
        case .record(let handle, .artifact(let path, let spoolPath)):
            w.u8(Kind.artifact.rawValue)
            w.string(handle)
            w.string(path)
            w.string(spoolPath)
        case .record(let handle, .deleteTag(let key)):
            w.u8(Kind.deleteTag.rawValue)
            w.string(handle)
            w.string(key)
        case .bind(let handle, let runID, let experimentID):
            w.u8(Kind.bind.rawValue)
            w.string(handle)
            w.string(runID)
            w.optional(experimentID)
        case .settled(let lsn):
            w.u8(Kind.settled.rawValue)
            w.u64(lsn)
        case .session(let record):
            w.u8(Kind.session.rawValue)
            var json = JSONWriter(capacity: 512)
            json.write(record.json)
            w.u32(UInt32(json.bytes.count))
            w.bytes.append(contentsOf: json.bytes)
        case .sessionMark(let id, let seq):
            w.u8(Kind.sessionMark.rawValue)
            w.string(id)
            w.u64(seq)
        case .sessionEnd(let id):
            w.u8(Kind.sessionEnd.rawValue)
            w.string(id)
        }
    }

    static func decode(_ r: inout JournalFieldReader) throws(Malformed) -> JournalEntry {
        guard let kind = Kind(rawValue: try r.u8()) else { throw Malformed() }
        switch kind {
        case .run:
            let handle = try r.string()
            let runID = try r.optional()
            let experimentID = try r.optional()
            let experimentName = try r.string()
            let name = try r.string()
            let owner = try r.u32()
            let pid = Int32(bitPattern: try r.u32())
            let status = try r.status()
            let parent = try r.optional()
            let params = try r.map()
            let endTime = try r.optionalInt()
            var e = RunEntry(
                handle: handle, runID: runID, experimentID: experimentID, experimentName: experimentName, name: name,
                ownerUID: owner, status: status, parentHandle: parent, params: params, connection: nil, clientPID: pid)
            e.endTime = endTime
            return .run(e)
        case .create:
            let handle = try r.string()
            let runID = try r.optional()
            let experimentName = try r.string()
            let experimentID = try r.optional()
            let name = try r.string()
            let user = try r.string()
            let owner = try r.u32()
            let pid = Int32(bitPattern: try r.u32())
            let start = Int64(bitPattern: try r.u64())
            let tags = try r.map()
            let parent = try r.optional()
            var c = RunCreation(
                handle: handle, runID: runID, experimentName: experimentName, name: name, userID: user,
                startTime: start, tags: tags, parentHandle: parent)
            c.experimentID = experimentID
            c.ownerUID = owner
            c.clientPID = pid
            return .record(handle: handle, .createRun(c))
        case .log:
            let handle = try r.string()
            let count = Int(try r.u32())
            guard count <= r.remaining / 28 else { throw Malformed() }
            var metrics: [MetricPoint] = []
            metrics.reserveCapacity(count)
            for _ in 0..<count {
                let key = try r.string()
                let value = Double(bitPattern: try r.u64())
                let step = Int64(bitPattern: try r.u64())
                let ts = Int64(bitPattern: try r.u64())
                metrics.append(MetricPoint(key: key, value: value, step: step, timestamp: ts))
            }
            return .record(handle: handle, .log(LogBatch(metrics: metrics, params: try r.map(), tags: try r.map())))
        case .update:
            return .record(handle: try r.string(), .updateRun(status: try r.status(), endTime: try r.optionalInt()))
        case .artifact:
            return .record(handle: try r.string(), .artifact(path: try r.string(), spoolPath: try r.string()))
        case .deleteTag:
            return .record(handle: try r.string(), .deleteTag(key: try r.string()))
        case .bind:
            return .bind(handle: try r.string(), runID: try r.string(), experimentID: try r.optional())
        case .settled:
            return .settled(try r.u64())
        case .session:
            let count = Int(try r.u32())
            guard let json = try? JSONParser.parse(Array(try r.take(count))), let record = SessionRecord(json: json) else { throw Malformed() }
            return .session(record)
        case .sessionMark:
            return .sessionMark(id: try r.string(), seq: try r.u64())
        case .sessionEnd:
            return .sessionEnd(id: try r.string())
        }
    }
}

/// Appends little-endian fields to a byte array.
struct JournalFieldWriter {
    var bytes: [UInt8]

    init(capacity: Int = 256) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func string(_ s: String) {
        var s = s
        s.withUTF8 { utf8 in
            u32(UInt32(utf8.count))
            bytes.append(contentsOf: utf8)
        }
    }
    mutating func optional(_ s: String?) {
        if let s {
            u8(1)
            string(s)
        } else {
            u8(0)
        }
    }
    mutating func optionalInt(_ v: Int64?) {
        if let v {
            u8(1)
            u64(UInt64(bitPattern: v))
        } else {
            u8(0)
        }
    }
    mutating func map(_ m: StringMap) {
        u32(UInt32(m.count))
        for (k, v) in m {
            string(k)
            string(v)
        }
    }
}

/// Reads what `JournalFieldWriter` wrote; every read is bounds-checked.
struct JournalFieldReader {
    let bytes: UnsafeRawBufferPointer
    var index = 0

    init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    var remaining: Int { bytes.count - index }

    mutating func take(_ n: Int) throws(JournalCodec.Malformed) -> UnsafeRawBufferPointer {
        guard n >= 0, n <= remaining else { throw JournalCodec.Malformed() }
        defer { index += n }
        return UnsafeRawBufferPointer(rebasing: bytes[index..<index + n])
    }

    mutating func u8() throws(JournalCodec.Malformed) -> UInt8 { try take(1)[0] }
    mutating func u32() throws(JournalCodec.Malformed) -> UInt32 { UInt32(littleEndian: try take(4).loadUnaligned(as: UInt32.self)) }
    mutating func u64() throws(JournalCodec.Malformed) -> UInt64 { UInt64(littleEndian: try take(8).loadUnaligned(as: UInt64.self)) }
    mutating func string() throws(JournalCodec.Malformed) -> String {
        let n = Int(try u32())
        guard let s = String(validating: try take(n), as: UTF8.self) else { throw JournalCodec.Malformed() }
        return s
    }
    mutating func optional() throws(JournalCodec.Malformed) -> String? { try u8() == 0 ? nil : try string() }
    mutating func optionalInt() throws(JournalCodec.Malformed) -> Int64? { try u8() == 0 ? nil : Int64(bitPattern: try u64()) }
    mutating func status() throws(JournalCodec.Malformed) -> RunStatus {
        guard let s = RunStatus(rawValue: try string()) else { throw JournalCodec.Malformed() }
        return s
    }
    mutating func map() throws(JournalCodec.Malformed) -> StringMap {
        let n = Int(try u32())
        guard n <= remaining / 8 else { throw JournalCodec.Malformed() }
        var m = StringMap()
        m.reserveCapacity(n)
        for _ in 0..<n {
            let k = try string()
            m[k] = try string()
        }
        return m
    }
}
