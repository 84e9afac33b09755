import ArmoryProtocol
import Foundation

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#elseif canImport(Darwin)
    import Darwin
#endif

/// A run as MLflow's file store records it in `meta.yaml`.
public struct FileStoreRun: Sendable, Equatable {
    public var runID: String
    public var experimentID: String
    public var name: String
    public var userID: String
    public var status: RunStatus
    public var startTime: Int64
    public var endTime: Int64?

    public init(runID: String, experimentID: String, name: String, userID: String, status: RunStatus, startTime: Int64, endTime: Int64? = nil) {
        self.runID = runID
        self.experimentID = experimentID
        self.name = name
        self.userID = userID
        self.status = status
        self.startTime = startTime
        self.endTime = endTime
    }
}

/// Why the file store refused or failed an operation.
public enum FileStoreError: Error, Equatable, Sendable, CustomStringConvertible {
    /// MLflow params are immutable: the key already holds another value.
    case paramChanged(key: String, old: String, new: String)
    case experimentDeleted(name: String, id: String)
    case runNotFound(String)
    case experimentNotFound(String)
    case tagNotFound(key: String, runID: String)
    case invalidPath(String)
    case io(String)

    public var description: String {
        switch self {
        case .paramChanged(let key, let old, let new):
            "Param '\(key)' was already logged with value '\(old.prefix(100))'; MLflow params cannot change (new value '\(new.prefix(100))'). Use a new key or a tag, or start a new run."
        case .experimentDeleted(let name, let id):
            "Experiment '\(name)' (id \(id)) is deleted. Restore it with `mlflow experiments restore --experiment-id \(id)` or choose another evaluation name."
        case .runNotFound(let id):
            "No run with id '\(id)' in the local store."
        case .experimentNotFound(let id):
            "No experiment with id '\(id)' in the local store."
        case .tagNotFound(let key, let runID):
            "No tag with name: \(key) in run with id \(runID)"
        case .invalidPath(let path):
            "Invalid artifact path '\(path)': use a relative path without '..' segments."
        case .io(let message):
            message
        }
    }
}

/// MLflow's file-store layout (`mlruns/`), written exactly as MLflow 3.17.2 writes it, so the real
/// MLflow (with `MLFLOW_ALLOW_FILE_STORE=true`) and `mlflow migrate-filestore` read it.
///
/// Not thread-safe: one owner (the daemon's uploader) calls it from one thread at a time.
public final class FileStore {
    public let root: String
    private var experimentIDs: [String: String] = [:]
    private var metaCache: [String: FileStoreRun] = [:]
    /// Runs whose records are being replayed from the daemon's journal: a metric line already in
    /// their files is not written twice.
    private var replaying = Set<String>()
    /// The lines already stored per metric file of a replaying run, read once.
    private var storedLines: [String: Set<Substring>] = [:]
    /// Files and directories written since the last `persist`.
    private var dirty = Set<String>()

    /// Opens (and lays out, if new) the store at `root`, an absolute path.
    public init(root: String) throws(FileStoreError) {
        self.root = root.hasSuffix("/") && root.count > 1 ? String(root.dropLast()) : root
        try makeDirectory(self.root)
        try makeDirectory(self.root + "/.trash")
        if !FileManager.default.fileExists(atPath: self.root + "/0/meta.yaml") {
            try writeExperimentMeta(id: "0", name: "Default", time: Self.nowMs())
        }
    }

    public static func nowMs() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
    }

    // MARK: Experiments

    /// The id of the active experiment called `name`, if there is one.
    public func existingExperimentID(named name: String) throws(FileStoreError) -> String? {
        if let id = experimentIDs[name] { return id }
        let (active, _) = scanExperiments()
        if let id = active[name] { experimentIDs[name] = id }
        return active[name]
    }

    /// The id of the experiment called `name`, created if there is none (get-or-create by name).
    /// The id of the active experiment `name`, created first (with `tags`) when there is none.
    public func experimentID(named name: String, tags: StringMap? = nil) throws(FileStoreError) -> String {
        if let id = experimentIDs[name] { return id }
        let (active, deleted) = scanExperiments()
        if let id = active[name] {
            experimentIDs[name] = id
            return id
        }
        if let id = deleted[name] { throw .experimentDeleted(name: name, id: id) }
        var id = Self.newExperimentID()
        while FileManager.default.fileExists(atPath: root + "/" + id) { id = Self.newExperimentID() }
        try writeExperimentMeta(id: id, name: name, time: Self.nowMs())
        for (key, value) in tags ?? [:] { try writeFile(root + "/" + id + "/tags/" + key, Array(value.utf8)) }
        experimentIDs[name] = id
        return id
    }

    /// Sets an experiment tag (MLflow's `set_experiment_tag`: `<experiment>/tags/<key>`).
    public func setExperimentTag(experimentID: String, key: String, value: String) throws(FileStoreError) {
        let dir = root + "/" + experimentID
        guard !experimentID.contains("/"), !experimentID.hasPrefix("."), StoreFiles.yaml(dir + "/meta.yaml") != nil else {
            throw .experimentNotFound(experimentID)
        }
        try writeFile(dir + "/tags/" + key, Array(value.utf8))
    }

    /// MLflow's experiment ids: 18 random decimal digits, no leading zero.
    static func newExperimentID() -> String {
        var digits = String((1...9).randomElement()!)
        for _ in 1..<18 { digits += String((0...9).randomElement()!) }
        return digits
    }

    private func scanExperiments() -> (active: [String: String], deleted: [String: String]) {
        var active: [String: String] = [:]
        var deleted: [String: String] = [:]
        for (dir, isTrash) in [(root, false), (root + "/.trash", true)] {
            for entry in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] where !entry.hasPrefix(".") {
                guard let meta = StoreFiles.yaml(dir + "/" + entry + "/meta.yaml"), let name = meta["name"] else { continue }
                if isTrash || meta["lifecycle_stage"] == "deleted" { deleted[name] = entry } else { active[name] = entry }
            }
        }
        return (active, deleted)
    }

    private func writeExperimentMeta(id: String, name: String, time: Int64) throws(FileStoreError) {
        let dir = root + "/" + id
        try makeDirectory(dir)
        let meta = """
            artifact_location: \(YAMLScalar.quoted(Self.fileURI(dir)))
            creation_time: \(time)
            effective_trace_archival_retention: null
            experiment_id: '\(id)'
            last_update_time: \(time)
            lifecycle_stage: active
            name: \(YAMLScalar.quoted(name))
            trace_location: null
            workspace: default

            """
        try writeAtomically(dir + "/meta.yaml", Array(meta.utf8))
    }

    // MARK: Runs

    public func runDirectory(_ run: FileStoreRun) -> String { root + "/" + run.experimentID + "/" + run.runID }

    /// Creates the run's directory, `meta.yaml` and its initial tags. Creating it again is a no-op
    /// apart from rewriting the same files (replay-safe).
    public func createRun(_ run: FileStoreRun, tags: StringMap) throws(FileStoreError) {
        let dir = runDirectory(run)
        for sub in ["", "/artifacts", "/metrics", "/params", "/tags"] { try makeDirectory(dir + sub) }
        try writeRunMeta(run)
        try writeTags(dir, tags)
        metaCache[run.runID] = run
    }

    /// Sets the run's status and end time (MLflow's `update_run_info`).
    public func updateRun(runID: String, experimentID: String, status: RunStatus, endTime: Int64?) throws(FileStoreError) {
        if status.isTerminal && replaying.remove(runID) != nil {
            let prefix = root + "/" + experimentID + "/" + runID + "/"
            storedLines = storedLines.filter { !$0.key.hasPrefix(prefix) }
        }
        guard var run = try loadRun(runID: runID, experimentID: experimentID) else { throw .runNotFound(runID) }
        run.status = status
        run.endTime = endTime
        try writeRunMeta(run)
        metaCache[runID] = run
    }

    /// Removes a run's tag (MLflow's `delete_tag`). A tag already gone is an error, as in MLflow,
    /// except during a replay, when this call may have removed it before the daemon stopped.
    public func deleteTag(runID: String, experimentID: String, key: String) throws(FileStoreError) {
        let path = root + "/" + experimentID + "/" + runID + "/tags/" + key
        guard unlink(path) == 0 else {
            if errno == ENOENT {
                if replaying.contains(runID) { return }
                throw .tagNotFound(key: key, runID: runID)
            }
            throw .io("cannot remove \(path): \(String(cString: strerror(errno)))")
        }
        if let slash = path.lastIndex(of: "/") { dirty.insert(String(path[..<slash])) }
    }

    /// Appends metrics, writes params (immutable) and tags (overwritten).
    public func logBatch(runID: String, experimentID: String, _ batch: LogBatch) throws(FileStoreError) {
        let dir = root + "/" + experimentID + "/" + runID
        for (key, value) in batch.params {
            let path = dir + "/params/" + key
            if let existing = StoreFiles.read(path) {
                let old = String(decoding: existing, as: UTF8.self)
                if old != value { throw .paramChanged(key: key, old: old, new: value) }
                continue
            }
            try writeFile(path, Array(value.utf8))
        }
        try writeTags(dir, batch.tags)
        // MLflow's stores keep the run's name and its `mlflow.runName` tag as one (a rename).
        if let name = batch.tags["mlflow.runName"], var run = try loadRun(runID: runID, experimentID: experimentID), run.name != name {
            run.name = name
            try writeRunMeta(run)
            metaCache[runID] = run
        }
        guard !batch.metrics.isEmpty else { return }
        var lines: [String: [UInt8]] = [:]
        var order: [String] = []
        for m in batch.metrics {
            if lines[m.key] == nil {
                order.append(m.key)
                lines[m.key] = []
            }
            lines[m.key]!.append(contentsOf: "\(m.timestamp) \(PythonFloat.repr(m.value)) \(m.step)\n".utf8)
        }
        for key in order {
            let path = dir + "/metrics/" + key
            var bytes = lines[key]!
            if replaying.contains(runID) { bytes = try unstored(bytes, in: path) }
            if !bytes.isEmpty { try appendFile(path, bytes) }
        }
    }

    /// Marks runs whose records are replayed: their metric lines are deduplicated against what is
    /// stored, so a replay never writes a point twice.
    public func replay(runIDs: Set<String>) {
        replaying.formUnion(runIDs)
    }

    /// The lines of `bytes` that `path` does not hold yet.
    private func unstored(_ bytes: [UInt8], in path: String) throws(FileStoreError) -> [UInt8] {
        if storedLines[path] == nil {
            let text = StoreFiles.read(path).map { String(decoding: $0, as: UTF8.self) } ?? ""
            storedLines[path] = Set(text.split(separator: "\n"))
        }
        let text = String(decoding: bytes, as: UTF8.self)
        var out: [UInt8] = []
        for line in text.split(separator: "\n") where !storedLines[path]!.contains(line) {
            out.append(contentsOf: line.utf8)
            out.append(UInt8(ascii: "\n"))
        }
        return out
    }

    /// Flushes every file (and directory) written since the last call to disk, before the
    /// daemon's journal forgets the records they hold.
    public func persist() {
        for path in dirty.sorted(by: { $0.count > $1.count }) {
            // Non-blocking: opening a FIFO (or another special file) for reading must not wait.
            let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
            guard fd >= 0 else { continue }
            fsync(fd)
            close(fd)
        }
        dirty.removeAll(keepingCapacity: true)
    }

    /// Moves (or copies, across file systems) a finished spool file into the run's artifacts.
    public func storeArtifact(runID: String, experimentID: String, path: String, from source: String) throws(FileStoreError) {
        do { try MLflowRules.validateArtifactPath(path) } catch { throw .invalidPath(path) }
        let target = root + "/" + experimentID + "/" + runID + "/artifacts/" + path
        if let slash = target.lastIndex(of: "/") { try makeDirectory(String(target[..<slash])) }
        if rename(source, target) == 0 { return }
        guard errno == EXDEV else { throw .io("cannot move artifact into \(target): \(String(cString: strerror(errno)))") }
        do {
            if FileManager.default.fileExists(atPath: target) { try FileManager.default.removeItem(atPath: target) }
            try FileManager.default.copyItem(atPath: source, toPath: target)
            try FileManager.default.removeItem(atPath: source)
        } catch {
            throw .io("cannot copy artifact into \(target): \(error)")
        }
    }

    /// Finds a run by id in any experiment (for `attach`).
    public func findRun(runID: String) -> FileStoreRun? {
        if let cached = metaCache[runID] { return cached }
        guard runID.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" || $0 == "-" }) else { return nil }
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? [] where !entry.hasPrefix(".") {
            if let run = try? loadRun(runID: runID, experimentID: entry) { return run }
        }
        return nil
    }

    /// The run's params as the store holds them.
    public func params(of run: FileStoreRun) -> StringMap {
        StoreFiles.tree(runDirectory(run) + "/params")
    }

    /// The run's tags as the store holds them.
    public func tags(of run: FileStoreRun) -> StringMap {
        StoreFiles.tree(runDirectory(run) + "/tags")
    }

    private func loadRun(runID: String, experimentID: String) throws(FileStoreError) -> FileStoreRun? {
        if let cached = metaCache[runID], cached.experimentID == experimentID { return cached }
        guard let meta = StoreFiles.yaml(root + "/" + experimentID + "/" + runID + "/meta.yaml") else { return nil }
        let statusCode = Int(meta["status"] ?? "") ?? 1
        let run = FileStoreRun(
            runID: runID, experimentID: experimentID, name: meta["run_name"] ?? "",
            userID: meta["user_id"] ?? "", status: Self.status(code: statusCode),
            startTime: Int64(meta["start_time"] ?? "") ?? 0, endTime: Int64(meta["end_time"] ?? ""))
        metaCache[runID] = run
        return run
    }

    static func statusCode(_ status: RunStatus) -> Int {
        switch status {
        case .running: 1
        case .scheduled: 2
        case .finished: 3
        case .failed: 4
        case .killed: 5
        }
    }

    static func status(code: Int) -> RunStatus {
        switch code {
        case 2: .scheduled
        case 3: .finished
        case 4: .failed
        case 5: .killed
        default: .running
        }
    }

    private func writeRunMeta(_ run: FileStoreRun) throws(FileStoreError) {
        let dir = runDirectory(run)
        let meta = """
            artifact_uri: \(YAMLScalar.quoted(Self.fileURI(dir + "/artifacts")))
            end_time: \(run.endTime.map(String.init) ?? "null")
            entry_point_name: ''
            experiment_id: '\(run.experimentID)'
            lifecycle_stage: active
            run_id: \(YAMLScalar.quoted(run.runID))
            run_name: \(YAMLScalar.quoted(run.name))
            source_name: ''
            source_type: 4
            source_version: ''
            start_time: \(run.startTime)
            status: \(Self.statusCode(run.status))
            tags: []
            user_id: \(YAMLScalar.quoted(run.userID))

            """
        try writeAtomically(dir + "/meta.yaml", Array(meta.utf8))
    }

    private func writeTags(_ runDir: String, _ tags: StringMap) throws(FileStoreError) {
        for (key, value) in tags { try writeFile(runDir + "/tags/" + key, Array(value.utf8)) }
    }

    /// `file://` URI of an absolute path, percent-encoding what a URI cannot hold.
    static func fileURI(_ path: String) -> String {
        var allowed = CharacterSet.urlPathAllowed
        allowed.remove(charactersIn: ";?#%")
        return "file://" + (path.addingPercentEncoding(withAllowedCharacters: allowed) ?? path)
    }

    // MARK: Files

    private func makeDirectory(_ path: String) throws(FileStoreError) {
        do throws(Directories.Failure) {
            try Directories.create(path)
        } catch {
            throw .io(error.description)
        }
    }

    private func parentDirectory(of path: String) throws(FileStoreError) {
        if let slash = path.lastIndex(of: "/") { try makeDirectory(String(path[..<slash])) }
    }

    private func writeFile(_ path: String, _ bytes: [UInt8]) throws(FileStoreError) {
        try parentDirectory(of: path)
        try writeAll(path, bytes, flags: O_WRONLY | O_CREAT | O_TRUNC)
    }

    private func appendFile(_ path: String, _ bytes: [UInt8]) throws(FileStoreError) {
        try parentDirectory(of: path)
        try writeAll(path, bytes, flags: O_WRONLY | O_CREAT | O_APPEND)
    }

    private func writeAtomically(_ path: String, _ bytes: [UInt8]) throws(FileStoreError) {
        let temp = path + ".tmp"
        try writeAll(temp, bytes, flags: O_WRONLY | O_CREAT | O_TRUNC)
        guard rename(temp, path) == 0 else { throw .io("cannot replace \(path): \(String(cString: strerror(errno)))") }
    }

    private func writeAll(_ path: String, _ bytes: [UInt8], flags: Int32) throws(FileStoreError) {
        let fd = open(path, flags | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw .io("cannot open \(path): \(String(cString: strerror(errno)))") }
        dirty.insert(path)
        if let slash = path.lastIndex(of: "/") { dirty.insert(String(path[..<slash])) }
        defer { close(fd) }
        if let failure = FileWrites.writeAll(fd, bytes) { throw .io("cannot write \(path): \(failure)") }
    }
}
