import ArmoryProtocol
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// Reading the files of MLflow's file-store layout, shared by the writer and the reader.
enum StoreFiles {
    static func read(_ path: String) -> [UInt8]? {
        FileManager.default.contents(atPath: path).map { Array($0) }
    }

    /// Files under `dir` as a map from their relative path to their content (keys with `/` nest).
    static func tree(_ dir: String) -> StringMap {
        var out = StringMap()
        for relative in files(under: dir) {
            if let bytes = read(dir + "/" + relative) { out[relative] = String(decoding: bytes, as: UTF8.self) }
        }
        return out
    }

    /// The relative paths of the regular files under `dir`, sorted.
    static func files(under dir: String) -> [String] {
        guard let walker = FileManager.default.enumerator(atPath: dir) else { return [] }
        var out: [String] = []
        while let relative = walker.nextObject() as? String {
            var isDir: ObjCBool = false
            if FileManager.default.fileExists(atPath: dir + "/" + relative, isDirectory: &isDir), !isDir.boolValue { out.append(relative) }
        }
        return out.sorted()
    }

    /// Reads the flat `key: value` lines of a `meta.yaml` (what we write, and what MLflow writes).
    static func yaml(_ path: String) -> [String: String]? {
        guard let bytes = read(path) else { return nil }
        var out: [String: String] = [:]
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":"), !line.hasPrefix(" ") else { continue }
            let key = String(line[..<colon])
            var value = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            if value.hasPrefix("'") && value.hasSuffix("'") && value.count >= 2 {
                value = String(value.dropFirst().dropLast()).replacingOccurrences(of: "''", with: "'")
            } else if value.hasPrefix("\""), value.hasSuffix("\""), value.count >= 2,
                case .string(let s)? = try? JSONParser.parse(Array(value.utf8))
            {
                value = s
            }
            out[key] = value
        }
        return out
    }
}

/// Reads any MLflow file store (`mlruns/`): written by armoryd, by MLflow itself, or copied off
/// another host. Read-only; artifacts are found under each run's directory, never through the
/// absolute URI recorded in `meta.yaml` (a copied store still names its old place).
public struct FileStoreReader: Sendable {
    /// An experiment as its `meta.yaml` records it.
    public struct Experiment: Sendable, Equatable {
        public var id: String
        public var name: String
        public var isDeleted: Bool
        public var tags: StringMap
    }

    /// A run as its `meta.yaml` records it, with where it lives.
    public struct Run: Sendable, Equatable {
        public var info: FileStoreRun
        public var isDeleted: Bool
        public var directory: String
    }

    public let root: String

    /// Opens the store at `root`; refuses a directory that is not an MLflow file store.
    public init(root: String) throws(FileStoreError) {
        let trimmed = root.count > 1 && root.hasSuffix("/") ? String(root.dropLast()) : root
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: trimmed, isDirectory: &isDir), isDir.boolValue else {
            throw .io("\(trimmed) does not exist or is not a directory: name an MLflow store (a directory such as ~/.armory/mlruns).")
        }
        self.root = trimmed
        guard !experiments().isEmpty else {
            throw .io("\(trimmed) is not an MLflow file store: it holds no experiment (no <id>/meta.yaml). Name the mlruns directory itself.")
        }
    }

    /// Every experiment, active and deleted, by id.
    public func experiments() -> [Experiment] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
        return entries.filter { !$0.hasPrefix(".") }.sorted().compactMap { id in
            guard let meta = StoreFiles.yaml(root + "/" + id + "/meta.yaml"), let name = meta["name"] else { return nil }
            return Experiment(
                id: meta["experiment_id"].flatMap { $0.isEmpty ? nil : $0 } ?? id, name: name,
                isDeleted: meta["lifecycle_stage"] == "deleted", tags: StoreFiles.tree(root + "/" + id + "/tags"))
        }
    }

    /// The runs of an experiment, oldest first.
    public func runs(of experiment: Experiment) -> [Run] {
        let dir = root + "/" + experiment.id
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        return entries.compactMap { entry -> Run? in
            guard entry != "tags", let meta = StoreFiles.yaml(dir + "/" + entry + "/meta.yaml") else { return nil }
            let info = FileStoreRun(
                runID: meta["run_id"].flatMap { $0.isEmpty ? nil : $0 } ?? entry, experimentID: experiment.id,
                name: meta["run_name"] ?? "", userID: meta["user_id"] ?? "", status: FileStore.status(code: Int(meta["status"] ?? "") ?? 1),
                startTime: Int64(meta["start_time"] ?? "") ?? 0, endTime: Int64(meta["end_time"] ?? ""))
            return Run(info: info, isDeleted: meta["lifecycle_stage"] == "deleted", directory: dir + "/" + entry)
        }.sorted { ($0.info.startTime, $0.info.runID) < ($1.info.startTime, $1.info.runID) }
    }

    public func params(of run: Run) -> StringMap { StoreFiles.tree(run.directory + "/params") }

    public func tags(of run: Run) -> StringMap { StoreFiles.tree(run.directory + "/tags") }

    /// One tag of the run (one file read, for scanning many runs).
    public func tag(of run: Run, key: String) -> String? {
        StoreFiles.read(run.directory + "/tags/" + key).map { String(decoding: $0, as: UTF8.self) }
    }

    /// The run's metric keys (a key with `/` is a nested file).
    public func metricKeys(of run: Run) -> [String] { StoreFiles.files(under: run.directory + "/metrics") }

    /// How many points a metric holds: its complete (newline-ended) lines, counted as the file
    /// streams by, without parsing them. A torn last line is not a point yet.
    public func metricCount(of run: Run, key: String) -> Int {
        guard let file = fopen(run.directory + "/metrics/" + key, "r") else { return 0 }
        defer { fclose(file) }
        var count = 0
        var block = [UInt8](repeating: 0, count: 1 << 16)
        while case let read = fread(&block, 1, block.count, file), read > 0 {
            for byte in block[..<read] where byte == UInt8(ascii: "\n") { count += 1 }
        }
        return count
    }

    /// A metric's points in the order they were logged, from the `from`-th complete line on.
    public func metricPoints(of run: Run, key: String, from first: Int = 0) -> [MetricPoint] {
        guard let stream = MetricStream(path: run.directory + "/metrics/" + key, key: key, from: first) else { return [] }
        var out: [MetricPoint] = []
        while let chunk = stream.next(upTo: 1 << 16) { out += chunk }
        return out
    }

    /// A metric's points from the `from`-th complete line on, read as a stream (a long history is
    /// never held whole); nil when the run has no such metric.
    public func metricStream(of run: Run, key: String, from first: Int) -> MetricStream? {
        MetricStream(path: run.directory + "/metrics/" + key, key: key, from: first)
    }

    /// One metric line, `<timestamp ms> <value> <step>` (values as Python prints them: `nan`, `inf`).
    static func point<Line: Collection<UInt8>>(key: String, line: Line) -> MetricPoint? {
        let fields = line.split(separator: UInt8(ascii: " "))
        guard fields.count == 3, let timestamp = Int64(String(decoding: fields[0], as: UTF8.self)),
            let value = Double(String(decoding: fields[1], as: UTF8.self)), let step = Int64(String(decoding: fields[2], as: UTF8.self))
        else { return nil }
        return MetricPoint(key: key, value: value, step: step, timestamp: timestamp)
    }

    /// The run's artifact files, relative to its artifact root, with their sizes.
    public func artifacts(of run: Run) -> [(path: String, bytes: Int)] {
        let dir = run.directory + "/artifacts"
        return StoreFiles.files(under: dir).map { path in
            let size = (try? FileManager.default.attributesOfItem(atPath: dir + "/" + path)[.size] as? Int) ?? 0
            return (path, size)
        }
    }

    /// The run's artifact files by relative path, with their sizes.
    public func artifactSizes(of run: Run) -> [String: Int] {
        Dictionary(artifacts(of: run).map { ($0.path, $0.bytes) }, uniquingKeysWith: { a, _ in a })
    }

    /// Where an artifact's bytes are.
    public func artifactFile(of run: Run, path: String) -> String { run.directory + "/artifacts/" + path }
}

/// Reads one metric file's points a chunk at a time. A line that does not parse is skipped; a
/// torn last line (no newline yet) is not read.
public final class MetricStream {
    private let file: UnsafeMutablePointer<FILE>
    private let key: String
    private var skip: Int
    private var line: UnsafeMutablePointer<CChar>?
    private var capacity = 0

    init?(path: String, key: String, from first: Int) {
        guard let file = fopen(path, "r") else { return nil }
        self.file = file
        self.key = key
        self.skip = first
    }

    deinit {
        free(line)
        fclose(file)
    }

    /// The next points, at most `count` of them; nil at the end.
    public func next(upTo count: Int) -> [MetricPoint]? {
        var chunk: [MetricPoint] = []
        while chunk.count < count, case let length = getline(&line, &capacity, file), length > 0, let text = line, text[length - 1] == 10 {
            if skip > 0 {
                skip -= 1
            } else if let point = FileStoreReader.point(key: key, line: UnsafeRawBufferPointer(start: text, count: length - 1)) {
                chunk.append(point)
            }
        }
        return chunk.isEmpty ? nil : chunk
    }
}
