#if canImport(Glibc)
import Glibc
#endif
import ArmoryProtocol
import Foundation
import Logging
import MLflow
import Synchronization

/// One `armoryctl sync`: copies the runs of a local store into a destination through its
/// uploader (batching, retries, the journal), in the background. Each run is planned against
/// what the destination already holds of it (`SyncRunPlan`), so a repeated or interrupted sync
/// sends only what is missing.
public final class SyncJob: Sendable {
    /// What `sync_status` and `status` show of a job.
    public struct Progress: Sendable {
        public var state = "planning"
        public var runsTotal = 0
        public var runsDone = 0
        public var runsCreated = 0
        public var runsUpToDate = 0
        public var metricsQueued = 0
        public var artifactBytesQueued = 0
        public var conflicts: [String] = []
        public var error: String?
        public var runs: [JSONValue] = []
    }

    public let id: Int
    public let source: String
    public let destination: String
    let request: SyncRequest
    let uploader: Uploader
    let spoolDirectory: String
    let logger: Logger
    private let progress = Mutex(Progress())

    init(id: Int, request: SyncRequest, source: String, uploader: Uploader, spoolDirectory: String, logger: Logger) {
        self.id = id
        self.request = request
        self.source = source
        self.uploader = uploader
        self.destination = uploader.destination
        self.spoolDirectory = spoolDirectory
        self.logger = logger
    }

    public var snapshot: Progress { progress.withLock { $0 } }

    public var json: JSONValue {
        let p = snapshot
        return .object([
            "id": .int(Int64(id)), "state": .string(p.state), "from": .string(source), "to": .string(destination),
            "dry_run": .bool(request.dryRun), "runs_total": .int(Int64(p.runsTotal)), "runs_done": .int(Int64(p.runsDone)),
            "runs_created": .int(Int64(p.runsCreated)), "runs_up_to_date": .int(Int64(p.runsUpToDate)),
            "metrics_queued": .int(Int64(p.metricsQueued)), "artifact_bytes_queued": .int(Int64(p.artifactBytesQueued)),
            "pending_records": .int(Int64(p.state == "uploading" || p.state == "complete" ? uploader.pending(upTo: lastTicket.load(ordering: .relaxed)) : 0)),
            "conflicts": .array(p.conflicts.map { .string($0) }), "error": p.error.map { .string($0) } ?? .null, "runs": .array(p.runs),
        ])
    }

    private let lastTicket = Atomic<UInt64>(0)

    /// Runs the job to its end: plans and queues every run, then waits until the destination
    /// confirmed all of it.
    func run() async {
        do {
            let reader = try FileStoreReader(root: source)
            let identity = Self.storeIdentity(reader)
            var selected: [(FileStoreReader.Experiment, FileStoreReader.Run)] = []
            for experiment in reader.experiments() where !experiment.isDeleted && (request.experiments.isEmpty || request.experiments.contains(experiment.name)) {
                for run in reader.runs(of: experiment) where !run.isDeleted { selected.append((experiment, run)) }
            }
            // Each run's parent link, read once (tags are files).
            let parentOf = Dictionary(selected.compactMap { _, run in reader.tags(of: run)["mlflow.parentRunId"].map { (run.info.runID, $0) } },
                                      uniquingKeysWith: { a, _ in a })
            if !request.runs.isEmpty {
                // A named run brings its ancestors along, so that its parent link can be rewritten.
                var wanted = Set(request.runs)
                var grew = true
                while grew {
                    grew = false
                    for (_, run) in selected where wanted.contains(run.info.runID) {
                        if let parent = parentOf[run.info.runID], wanted.insert(parent).inserted { grew = true }
                    }
                }
                let missing = Set(request.runs).subtracting(selected.map(\.1.info.runID))
                if !missing.isEmpty { throw ProtocolError(.notFound, "No run \(missing.sorted().joined(separator: ", ")) in \(source).") }
                selected = selected.filter { wanted.contains($0.1.info.runID) }
            }
            // Parents before their children.
            let present = Set(selected.map(\.1.info.runID))
            var depth: [String: Int] = [:]
            for (_, run) in selected {
                var d = 0, current = run.info.runID
                while d < 64, let parent = parentOf[current], present.contains(parent) { d += 1; current = parent }
                depth[run.info.runID] = d
            }
            selected.sort { (depth[$0.1.info.runID]!, $0.1.info.startTime) < (depth[$1.1.info.runID]!, $1.1.info.startTime) }
            progress.withLock { $0.runsTotal = selected.count; $0.state = "copying" }

            // Records of earlier syncs still queued (replayed after a restart, say) land first, so
            // that what the destination holds is what it will hold.
            let earlier = uploader.lastTicket
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in uploader.whenSettled(upTo: earlier) { done.resume() } }
            var destinationIDs: [String: String] = [:]  // source run id -> destination run id, when known
            for (experiment, run) in selected {
                try await copy(run, reader: reader, experiment: experiment.name, identity: identity, destinationIDs: &destinationIDs)
            }
            if request.dryRun {
                progress.withLock { $0.state = "complete" }
                return
            }
            progress.withLock { $0.state = "uploading" }
            let ticket = lastTicket.load(ordering: .relaxed)
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in uploader.whenSettled(upTo: ticket) { done.resume() } }
            progress.withLock { $0.state = "complete" }
            logger.info("sync complete", metadata: ["from": "\(source)", "to": "\(destination)", "runs": "\(selected.count)"])
        } catch let error as ProtocolError {
            progress.withLock { $0.state = "failed"; $0.error = error.message }
        } catch {
            progress.withLock { $0.state = "failed"; $0.error = "\(error)" }
        }
    }

    /// Plans one run against the destination and queues what it lacks.
    private func copy(_ run: FileStoreReader.Run, reader: FileStoreReader, experiment: String, identity: String, destinationIDs: inout [String: String]) async throws {
        let runID = run.info.runID
        let keys = reader.metricKeys(of: run)
        let counts = Dictionary(uniqueKeysWithValues: keys.map { ($0, reader.metricPoints(of: run, key: $0).count) })
        let artifacts = reader.artifacts(of: run)
        let source = SyncSource(run: run.info, params: reader.params(of: run), tags: reader.tags(of: run), metricCounts: counts,
                                artifactBytes: Dictionary(artifacts.map { ($0.path, $0.bytes) }, uniquingKeysWith: { a, _ in a }))
        let create = !request.dryRun
        let lookup = try await call { (sink) async throws(ProtocolError) -> SyncedRunLookup in
            try await sink.syncedRun(experimentName: experiment, create: create, sourceRunID: runID, metricKeys: keys)
        }
        let existing = lookup.run
        let experimentID = lookup.experimentID ?? ""
        let sourceParent = source.tags["mlflow.parentRunId"]
        let parentHandle = sourceParent.map { Self.handle($0) }
        let parentID = sourceParent.flatMap { destinationIDs[$0] }
        let plan = SyncRunPlan.plan(source, destination: existing, parentRunID: existing == nil ? nil : parentID, storeIdentity: identity)
        if let existing { destinationIDs[runID] = existing.runID }
        var summary: JSONObject = [
            "source_run": .string(runID), "name": .string(run.info.name), "destination_run": existing.map { .string($0.runID) } ?? .null,
            "created": .bool(plan.create), "metrics": .int(Int64(plan.metricPoints)), "params": .int(Int64(plan.params.count)),
            "artifacts": .int(Int64(plan.artifacts.count)), "up_to_date": .bool(plan.upToDate),
        ]
        if !plan.conflicts.isEmpty {
            summary["conflicts"] = .array(plan.conflicts.map { .object(["key": .string($0.key), "source": .string($0.source), "destination": .string($0.destination)]) })
        }
        let conflicts = plan.conflicts.map { "run \(runID) (\(run.info.name)): param '\($0.key)' is '\($0.destination)' at the destination, '\($0.source)' here; kept the destination's" }
        progress.withLock {
            $0.runs.append(.object(summary))
            $0.conflicts += conflicts
        }
        if request.dryRun || plan.upToDate {
            progress.withLock { $0.runsDone += 1; if plan.upToDate { $0.runsUpToDate += 1 } }
            return
        }

        let handle = Self.handle(runID)
        if let existing {
            uploader.attach(RunEntry(handle: handle, runID: existing.runID, experimentID: experimentID, experimentName: "", name: run.info.name,
                                     ownerUID: getuid(), status: existing.status, parentHandle: nil, params: [:], connection: nil, clientPID: 0))
            if !plan.tags.isEmpty { enqueue(handle, .log(LogBatch(tags: plan.tags))) }
        } else {
            var tags = plan.tags
            tags["armory.handle"] = handle  // lets a create that may have reached the server be found, not repeated
            // The parent link: the uploader adds the parent's id once the parent exists (it may be
            // created by this very sync); a parent that already existed is bound by id.
            if let sourceParent, let parentID = destinationIDs[sourceParent] {
                uploader.attach(RunEntry(handle: Self.handle(sourceParent), runID: parentID, experimentID: experimentID, experimentName: "", name: "",
                                         ownerUID: getuid(), status: .running, parentHandle: nil, params: [:], connection: nil, clientPID: 0))
            }
            var creation = RunCreation(handle: handle, runID: nil, experimentName: "", name: run.info.name, userID: run.info.userID,
                                       startTime: run.info.startTime, tags: tags, parentHandle: sourceParent == nil ? nil : parentHandle)
            creation.experimentID = experimentID
            creation.ownerUID = getuid()
            enqueue(handle, .createRun(creation))
        }
        if !plan.params.isEmpty {
            for chunk in Array(plan.params).chunked(100) { enqueue(handle, .log(LogBatch(params: StringMap(uniqueKeysWithValues: chunk.map { ($0.key, $0.value) })))) }
        }
        for metric in plan.metrics {
            let points = reader.metricPoints(of: run, key: metric.key, from: metric.from)
            for chunk in points.chunked(1000) { enqueue(handle, .log(LogBatch(metrics: Array(chunk)))) }
            progress.withLock { $0.metricsQueued += points.count }
        }
        for path in plan.artifacts {
            let spool = spoolDirectory + "/sync-" + DaemonServices.newRunID()
            let file = reader.artifactFile(of: run, path: path)
            // A hard link costs nothing; across file systems, a streamed copy.
            if link(file, spool) != 0 { try FileManager.default.copyItem(atPath: file, toPath: spool) }
            enqueue(handle, .artifact(path: path, spoolPath: spool))
            progress.withLock { $0.artifactBytesQueued += source.artifactBytes[path] ?? 0 }
        }
        if let status = plan.status { enqueue(handle, .updateRun(status: status.status, endTime: status.endTime)) }
        if plan.marksComplete { enqueue(handle, .log(LogBatch(tags: [SyncTags.state: "complete"]))) }
        progress.withLock { $0.runsDone += 1; if plan.create { $0.runsCreated += 1 } }
    }

    private func enqueue(_ handle: String, _ record: SinkRecord) {
        let enqueued = uploader.enqueue(handle, record)
        lastTicket.store(enqueued.ticket, ordering: .relaxed)
    }

    /// A sink call on the destination's uploader, as an async value.
    private func call<Value: Sendable>(_ work: @escaping @Sendable (any RecordSink) async throws(ProtocolError) -> Value) async throws(ProtocolError) -> Value {
        let result = await withCheckedContinuation { (done: CheckedContinuation<Result<Value, ProtocolError>, Never>) in
            uploader.callSink(work) { done.resume(returning: $0) }
        }
        return try result.get()
    }

    /// The uploader handle of a source run's copy: the same for every sync of that run.
    static func handle(_ sourceRunID: String) -> String { handlePrefix + sourceRunID }
    static let handlePrefix = "sync-"

    /// The store's identity: `<root>/.armory-store-id`, created on first use when the store is
    /// writable (a copy carried to another host keeps it), else the store's path.
    static func storeIdentity(_ reader: FileStoreReader) -> String {
        let file = reader.root + "/.armory-store-id"
        if let text = try? String(contentsOfFile: file, encoding: .utf8), !text.isEmpty {
            return text.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        let fresh = DaemonServices.newRunID()
        if (try? fresh.write(toFile: file, atomically: true, encoding: .utf8)) != nil { return fresh }
        return reader.root
    }
}

/// The daemon's sync jobs, newest last.
public final class SyncJobs: Sendable {
    private let jobs = Mutex<[SyncJob]>([])
    /// The daemon's own local store (the default source), when it has one.
    public let localStore: String?

    public init(localStore: String?) {
        self.localStore = localStore
    }

    public var all: [SyncJob] { jobs.withLock { $0 } }

    /// Starts a job in the background and returns it.
    func start(_ request: SyncRequest, source: String, uploader: Uploader, spoolDirectory: String, logger: Logger) -> SyncJob {
        let job = jobs.withLock { all -> SyncJob in
            let job = SyncJob(id: all.count + 1, request: request, source: source, uploader: uploader, spoolDirectory: spoolDirectory, logger: logger)
            all.append(job)
            return job
        }
        Task { await job.run() }
        return job
    }
}

extension Collection {
    /// Consecutive slices of at most `size` elements.
    func chunked(_ size: Int) -> [SubSequence] {
        var out: [SubSequence] = []
        var start = startIndex
        while start != endIndex {
            let end = index(start, offsetBy: size, limitedBy: endIndex) ?? endIndex
            out.append(self[start..<end])
            start = end
        }
        return out
    }
}
