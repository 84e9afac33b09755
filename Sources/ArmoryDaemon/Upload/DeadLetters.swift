import ArmoryProtocol
import Foundation
import MLflow
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// One line of a dead-letter file: a record the destination refused for good, with why
/// (docs/architecture.md, "Refused records").
public struct DeadLetterLine: Sendable, Equatable {
    public var timeMs: Int64
    public var destination: String
    public var runID: String?
    public var parentRunID: String?
    public var handle: String
    public var uid: UInt32
    public var record: SinkRecord
    public var httpStatus: Int?
    public var serverCode: String?
    public var code: ErrorCode
    public var message: String

    public var json: JSONObject {
        var o: JSONObject = [
            "time_ms": .int(timeMs), "destination": .string(destination), "handle": .string(handle), "uid": .int(Int64(uid)),
            "record": .object(Self.json(record)), "code": .string(code.rawValue), "message": .string(message),
            "run_id": runID.map { .string($0) } ?? .null, "http_status": httpStatus.map { .int(Int64($0)) } ?? .null,
            "error_code": serverCode.map { .string($0) } ?? .null,
        ]
        if let parentRunID { o["parent_run_id"] = .string(parentRunID) }
        return o
    }

    public init(timeMs: Int64, destination: String, letter: DeadLetter, uid: UInt32) {
        self.timeMs = timeMs
        self.destination = destination
        runID = letter.runID
        parentRunID = letter.parentRunID
        handle = letter.handle
        self.uid = uid
        record = letter.record
        httpStatus = letter.refusal.httpStatus
        serverCode = letter.refusal.serverCode
        code = letter.refusal.error.code
        message = letter.refusal.error.message
    }

    public init?(json o: JSONObject) {
        guard let time = o["time_ms"]?.intValue, let destination = o["destination"]?.stringValue, let handle = o["handle"]?.stringValue,
            let uid = o["uid"]?.intValue, let recordJSON = o["record"]?.objectValue, let record = Self.record(recordJSON),
            let code = o["code"]?.stringValue.flatMap(ErrorCode.init(rawValue:)), let message = o["message"]?.stringValue
        else { return nil }
        timeMs = time
        self.destination = destination
        self.handle = handle
        self.uid = UInt32(truncatingIfNeeded: uid)
        self.record = record
        self.code = code
        self.message = message
        runID = o["run_id"]?.stringValue
        parentRunID = o["parent_run_id"]?.stringValue
        httpStatus = o["http_status"]?.intValue.map { Int($0) }
        serverCode = o["error_code"]?.stringValue
    }

    /// A record as JSON: `kind` and its fields (metrics as `[key, value, step, timestamp]`).
    static func json(_ record: SinkRecord) -> JSONObject {
        func object(_ map: StringMap) -> JSONValue { .object(map.mapValues { .string($0) }) }
        switch record {
        case .createRun(let c):
            var o: JSONObject = [
                "kind": .string("create_run"), "experiment_name": .string(c.experimentName), "name": .string(c.name),
                "user_id": .string(c.userID), "start_time": .int(c.startTime), "tags": object(c.tags),
                "owner_uid": .int(Int64(c.ownerUID)), "client_pid": .int(Int64(c.clientPID)),
            ]
            if let id = c.experimentID { o["experiment_id"] = .string(id) }
            if let id = c.runID { o["run_id"] = .string(id) }
            return o
        case .log(let b):
            return [
                "kind": .string("log"), "metrics": .array(b.metrics.map { .array([.string($0.key), .double($0.value), .int($0.step), .int($0.timestamp)]) }),
                "params": object(b.params), "tags": object(b.tags),
            ]
        case .updateRun(let status, let endTime):
            return ["kind": .string("update_run"), "status": .string(status.rawValue), "end_time": endTime.map { .int($0) } ?? .null]
        case .artifact(let path, let spoolPath):
            return ["kind": .string("artifact"), "path": .string(path), "file": .string(spoolPath)]
        case .deleteTag(let key):
            return ["kind": .string("delete_tag"), "key": .string(key)]
        }
    }

    static func record(_ o: JSONObject) -> SinkRecord? {
        func map(_ key: String) -> StringMap {
            var out = StringMap()
            for (k, v) in o[key]?.objectValue ?? [:] { if let s = v.stringValue { out[k] = s } }
            return out
        }
        switch o["kind"]?.stringValue {
        case "create_run":
            guard let experiment = o["experiment_name"]?.stringValue, let name = o["name"]?.stringValue, let user = o["user_id"]?.stringValue,
                let start = o["start_time"]?.intValue
            else { return nil }
            var c = RunCreation(
                handle: "", runID: o["run_id"]?.stringValue, experimentName: experiment, experimentID: o["experiment_id"]?.stringValue,
                name: name, userID: user, startTime: start, tags: map("tags"), parentHandle: nil)
            c.ownerUID = UInt32(truncatingIfNeeded: o["owner_uid"]?.intValue ?? 0)
            c.clientPID = Int32(truncatingIfNeeded: o["client_pid"]?.intValue ?? 0)
            return .createRun(c)
        case "log":
            var b = LogBatch(params: map("params"), tags: map("tags"))
            for row in o["metrics"]?.arrayValue ?? [] {
                guard let cells = row.arrayValue, cells.count == 4, let key = cells[0].stringValue, let value = cells[1].doubleValue,
                    let step = cells[2].intValue, let time = cells[3].intValue
                else { return nil }
                b.metrics.append(MetricPoint(key: key, value: value, step: step, timestamp: time))
            }
            return .log(b)
        case "update_run":
            guard let status = o["status"]?.stringValue.flatMap(RunStatus.init(rawValue:)) else { return nil }
            return .updateRun(status: status, endTime: o["end_time"]?.intValue)
        case "artifact":
            guard let path = o["path"]?.stringValue, let file = o["file"]?.stringValue else { return nil }
            return .artifact(path: path, spoolPath: file)
        case "delete_tag":
            return o["key"]?.stringValue.map { .deleteTag(key: $0) }
        default:
            return nil
        }
    }
}

/// A destination's dead-letter file, `<state>/dead-letters/<destination>.jsonl`: what it refused
/// for good, one JSON line per refused record, kept until `armoryctl errors --retry` sends it
/// again. A refused artifact's file moves to `<destination>.files/` beside it.
public final class DeadLetterFile: Sendable {
    public let path: String
    public let destination: String
    private let filesDirectory: String
    private let lock = Mutex(())

    /// The file of `destination` in `directory` (created when missing).
    public init(directory: String, destination: String) throws(ProtocolError) {
        let name = String(destination.map { $0.isLetter || $0.isNumber || $0 == "." || $0 == "-" ? $0 : "_" }).prefix(200)
        path = directory + "/" + name + ".jsonl"
        filesDirectory = directory + "/" + name + ".files"
        self.destination = destination
        do { try Directories.create(directory, mode: 0o700) } catch {
            throw ProtocolError(.internalError, "Cannot create the dead-letter directory \(directory): \(error)")
        }
    }

    /// Appends refused records (and keeps the files of refused artifacts); `owner` names each
    /// record's uid.
    public func append(_ letters: [DeadLetter], owner: (String) -> UInt32) {
        guard !letters.isEmpty else { return }
        let now = WallClock.nowMs()
        let bytes = Self.render(
            letters.map { original in
                var letter = original
                if case .artifact(let artifactPath, let spool) = letter.record {
                    letter.record = .artifact(path: artifactPath, spoolPath: keep(spool))
                }
                return DeadLetterLine(timeMs: now, destination: destination, letter: letter, uid: owner(letter.handle))
            })
        lock.withLock { _ in _ = Self.write(bytes, to: path, flags: O_APPEND) }
    }

    /// Every line, oldest first (lines that do not parse are skipped).
    public var lines: [DeadLetterLine] {
        lock.withLock { _ in read() }
    }

    /// Removes these lines from the file (they were queued again); lines added since stay.
    public func remove(_ lines: [DeadLetterLine]) {
        guard !lines.isEmpty else { return }
        lock.withLock { _ in
            var gone = lines
            let kept = read().filter { line in
                guard let i = gone.firstIndex(of: line) else { return true }
                gone.remove(at: i)
                return false
            }
            let temporary = path + ".tmp"
            if Self.write(Self.render(kept), to: temporary, flags: O_TRUNC) { rename(temporary, path) }
        }
    }

    /// Lines as JSON Lines.
    private static func render(_ lines: [DeadLetterLine]) -> [UInt8] {
        var writer = JSONWriter(capacity: 512 * lines.count)
        for line in lines {
            writer.write(.object(line.json))
            writer.bytes.append(UInt8(ascii: "\n"))
        }
        return writer.bytes
    }

    /// Writes `bytes` whole and fsyncs them (`flags`: `O_APPEND` or `O_TRUNC`); false when it failed.
    private static func write(_ bytes: [UInt8], to path: String, flags: Int32) -> Bool {
        let fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | flags, 0o600)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return FileWrites.writeAll(fd, bytes) == nil && fsync(fd) == 0
    }

    private func read() -> [DeadLetterLine] {
        guard let data = FileManager.default.contents(atPath: path) else { return [] }
        return data.split(separator: UInt8(ascii: "\n")).compactMap { line in
            guard case .object(let o)? = try? JSONParser.parse(Array(line)) else { return nil }
            return DeadLetterLine(json: o)
        }
    }

    /// Moves a refused artifact's spool file beside the dead-letter file (the spool is cleaned
    /// of files the journal no longer names).
    private func keep(_ spool: String) -> String {
        guard access(spool, F_OK) == 0 else { return spool }
        try? Directories.create(filesDirectory, mode: 0o700)
        let kept = filesDirectory + "/" + (spool as NSString).lastPathComponent
        return rename(spool, kept) == 0 ? kept : spool
    }
}
