import ArmoryProtocol
import Foundation
import Logging
import ServiceLifecycle
import MLflow
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// One `armoryctl sync`: copies the runs of a local store into a destination through its
/// uploader (batching, retries, the journal), in the background. Each run is planned against
/// what the destination already holds of it (`SyncRunPlan`), so a repeated or interrupted sync
/// sends only what is missing.
public final class SyncJob: Sendable {
    public let id: Int
    public let source: String
    let request: SyncRequest
    let uploader: Uploader
    let spoolDirectory: String
    let logger: Logger
    /// What `sync_status` and `status` show of the job, but for its pending records (read from the uploader).
    private let progress: Mutex<SyncJobStatus>

    init(id: Int, request: SyncRequest, source: String, uploader: Uploader, spoolDirectory: String, logger: Logger) {
        self.id = id
        self.request = request
        self.source = source
        self.uploader = uploader
        self.spoolDirectory = spoolDirectory
        self.logger = logger
        self.progress = Mutex(SyncJobStatus(id: Int64(id), state: "planning", from: source, to: uploader.destination, dryRun: request.dryRun))
    }

    /// The job as `sync`, `sync_status` and `status` answer it.
    public var status: SyncJobStatus {
        var status = progress.withLock { $0 }
        status.pendingRecords = Int64(uploader.pending(upTo: lastTicket.load(ordering: .relaxed)))
        return status
    }

    private let lastTicket = Atomic<UInt64>(0)
    /// Why runs failed, by source run id (a rejected record, a refused experiment).
    private let failures = Mutex<[String: String]>([:])

    /// How long the first look at the destination waits for it: an address that does not answer
    /// at all fails the job soon, with nothing copied.
    static let firstPatienceSeconds = 15.0
    /// How long later looks wait out an outage (uploads themselves wait as long as it takes).
    static let patienceSeconds = 600.0
    /// Records queued ahead of what the destination confirmed: the sync reads its store no faster
    /// than the destination takes it, so neither memory nor the journal grow with the store.
    static let windowRecords = 200

    /// Runs the job to its end: plans and queues every run, waits until the destination confirmed
    /// all of it, then marks the runs that landed whole `complete`.
    func run() async {
        do {
            let reader = try FileStoreReader(root: source)
            let identity = Self.storeIdentity(reader)
            let selected = try select(reader)
            progress.withLock { $0.runsTotal = Int64(selected.runs.count) }

            // Records of earlier syncs still queued (replayed after a restart, say) land first, so
            // that what the destination holds is what it will hold.
            await settled(upTo: uploader.lastTicket)
            var copied = Copied()
            var planned: [PlannedRun] = []
            for (index, (experiment, run)) in selected.runs.enumerated() where !failedWithParent(run.info.runID, parent: selected.parentOf[run.info.runID]) {
                try Task.checkCancellation()
                do throws(ProtocolError) {
                    if let next = try await plan(
                        run, reader: reader, experiment: experiment.name, identity: identity, into: &copied,
                        patience: index == 0 ? Self.firstPatienceSeconds : Self.patienceSeconds)
                    {
                        planned.append(next)
                    }
                } catch {
                    // Refused credentials, or a destination that stopped answering: every other run would fail the same way.
                    if error.code == .permissionDenied || error.code == .unreachable { throw error }
                    fail(run.info.runID, error.message)
                }
            }
            if request.dryRun {
                finish(runs: selected.runs.count)
                return
            }
            progress.withLock { $0.state = "copying" }
            for next in planned where !failedWithParent(next.source.run.runID, parent: next.source.tags["mlflow.parentRunId"]) {
                try Task.checkCancellation()
                await send(next, reader: reader, into: &copied)
            }
            progress.withLock { $0.state = "uploading" }
            await settled(upTo: lastTicket.load(ordering: .relaxed))
            try Task.checkCancellation()
            // Only a run whose every record landed is sealed (its landed record, and the complete
            // mark when it has ended); one with a rejected record stays partial, so that no half
            // copy looks whole and its next sync reads what it holds.
            let failed = failures.withLock { $0 }
            for (runID, handle, seal) in copied.toSeal where failed[runID] == nil {
                enqueue(handle, runID, .log(LogBatch(tags: seal)))
            }
            await settled(upTo: lastTicket.load(ordering: .relaxed))
            finish(runs: selected.runs.count)
        } catch let error as ProtocolError {
            progress.withLock {
                $0.state = "failed"
                $0.error = error.message
            }
        } catch is CancellationError {
            progress.withLock {
                $0.state = "failed"
                $0.error = "armoryd stopped during the sync. Run it again: it sends only what the destination does not hold."
            }
        } catch {
            progress.withLock {
                $0.state = "failed"
                $0.error = "\(error)"
            }
        }
    }

    /// The runs to copy, parents before their children, and each run's parent link.
    private func select(_ reader: FileStoreReader) throws(ProtocolError) -> (runs: [(FileStoreReader.Experiment, FileStoreReader.Run)], parentOf: [String: String]) {
        var selected: [(FileStoreReader.Experiment, FileStoreReader.Run)] = []
        for experiment in reader.experiments() where !experiment.isDeleted && (request.experiments.isEmpty || request.experiments.contains(experiment.name)) {
            for run in reader.runs(of: experiment) where !run.isDeleted { selected.append((experiment, run)) }
        }
        let missingExperiments = Set(request.experiments).subtracting(selected.map(\.0.name))
        if !missingExperiments.isEmpty {
            throw ProtocolError(.notFound, "No experiment \(missingExperiments.sorted().map { "'\($0)'" }.joined(separator: ", ")) with runs in \(source).")
        }
        // Each run's parent link, read once (tags are files).
        let parentOf = Dictionary(
            selected.compactMap { _, run in reader.tag(of: run, key: "mlflow.parentRunId").map { (run.info.runID, $0) } },
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
        let present = Set(selected.map(\.1.info.runID))
        var depth: [String: Int] = [:]
        for (_, run) in selected {
            var d = 0
            var current = run.info.runID
            while d < 64, let parent = parentOf[current], present.contains(parent) {
                d += 1
                current = parent
            }
            depth[run.info.runID] = d
        }
        selected.sort { (depth[$0.1.info.runID]!, $0.1.info.startTime) < (depth[$1.1.info.runID]!, $1.1.info.startTime) }
        return (selected, parentOf)
    }

    /// What the copying pass leaves for the end: destination ids known so far, and the runs to
    /// seal once everything has landed.
    private struct Copied {
        var destinationIDs: [String: String] = [:]  // source run id -> destination run id, when known
        var toSeal: [(runID: String, handle: String, tags: StringMap)] = []
        /// The pacing window: the ticket it waits for, and records queued since it was taken.
        var window: (ticket: UInt64, records: Int) = (0, 0)
    }

    private func fail(_ runID: String, _ why: String) {
        failures.withLock { $0[runID] = $0[runID] ?? why }
    }

    /// Fails a run whose parent was not copied (its link could not be rewritten); true if so.
    private func failedWithParent(_ runID: String, parent: String?) -> Bool {
        guard let parent, let why = failures.withLock({ $0[parent] }) else { return false }
        fail(runID, "its parent run \(parent) was not copied (\(why))")
        return true
    }

    private func finish(runs: Int) {
        let failed = failures.withLock { $0 }
        progress.withLock {
            $0.failures = failed.sorted { $0.key < $1.key }.map { "run \($0.key): \($0.value)" }
            if failed.isEmpty {
                $0.state = "complete"
            } else {
                $0.state = "failed"
                let rest = failed.count == runs ? "" : "; the other \(runs - failed.count) are complete"
                $0.error = "\(failed.count) of \(runs) runs not copied whole\(rest). A run not copied whole stays tagged armory.sync.state=partial: fix what the failures name, then sync again."
            }
        }
        logger.info("sync finished", metadata: ["from": "\(source)", "to": "\(uploader.destination)", "runs": "\(runs)", "failed": "\(failed.count)"])
    }

    /// Reports a job the daemon will not run (it is stopping).
    func stopped() {
        progress.withLock {
            $0.state = "failed"
            $0.error = "armoryd is stopping: the sync did not start. Run it again once armoryd is back."
        }
    }

    /// Waits until the destination settled everything up to `ticket`, or the job is cancelled
    /// (the daemon stops: what it queued stays in the journal).
    private func settled(upTo ticket: UInt64) async {
        let waiting = Mutex<CheckedContinuation<Void, Never>?>(nil)
        await withTaskCancellationHandler {
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                waiting.withLock { $0 = done }
                if Task.isCancelled { waiting.withLock { $0.take() }?.resume() }
                uploader.whenSettled(upTo: ticket) { waiting.withLock { $0.take() }?.resume() }
            }
        } onCancel: {
            waiting.withLock { $0.take() }?.resume()
        }
    }

    /// Holds the copying pass back while more than a window of its records wait for the destination.
    private func pace(_ copied: inout Copied) async {
        copied.window.records += 1
        guard copied.window.records >= Self.windowRecords else { return }
        await settled(upTo: copied.window.ticket)
        copied.window = (lastTicket.load(ordering: .relaxed), 0)
    }

    /// One run, planned: what the source holds, what the destination holds of it, what to send.
    private struct PlannedRun {
        var run: FileStoreReader.Run
        var source: SyncSource
        var experimentID: String
        var existing: SyncDestination?
        var plan: SyncRunPlan
    }

    /// Plans one run against what the destination holds of it; nil when there is nothing to send.
    private func plan(_ run: FileStoreReader.Run, reader: FileStoreReader, experiment: String, identity: String, into copied: inout Copied, patience: Double) async throws(ProtocolError) -> PlannedRun? {
        let runID = run.info.runID
        let keys = reader.metricKeys(of: run)
        let counts = Dictionary(uniqueKeysWithValues: keys.map { ($0, reader.metricCount(of: run, key: $0)) })
        let source = SyncSource(
            run: run.info, params: reader.params(of: run), tags: reader.tags(of: run), metricCounts: counts,
            artifactBytes: reader.artifactSizes(of: run))
        let create = !request.dryRun
        let lookup = try await call { (sink) async throws(ProtocolError) -> SyncedRunLookup in
            guard let reader = sink as? any SyncDestinationReader else {
                throw ProtocolError(.invalidValue, "\(sink.destination) cannot be a sync destination: sync copies into an MLflow server (http(s)://…) or a local store.")
            }
            return try await reader.syncedRun(experimentName: experiment, create: create, sourceRunID: runID, metricKeys: keys, patience: patience)
        }
        let existing = lookup.run
        let experimentID = lookup.experimentID ?? ""
        let sourceParent = source.tags["mlflow.parentRunId"]
        let parentID = sourceParent.flatMap { copied.destinationIDs[$0] }
        let plan = SyncRunPlan.plan(source, destination: existing, parentRunID: existing == nil ? nil : parentID, storeIdentity: identity)
        if let existing { copied.destinationIDs[runID] = existing.runID }
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
            $0.metricsTotal += Int64(plan.metricPoints)
            $0.artifactBytesTotal += Int64(plan.artifacts.reduce(0) { $0 + (source.artifactBytes[$1] ?? 0) })
        }
        if request.dryRun || plan.upToDate {
            progress.withLock {
                $0.runsDone += 1
                if plan.upToDate { $0.runsUpToDate += 1 }
            }
            return nil
        }
        return PlannedRun(run: run, source: source, experimentID: experimentID, existing: existing, plan: plan)
    }

    /// Queues what a planned run lacks at the destination, at the pace the destination takes it.
    private func send(_ planned: PlannedRun, reader: FileStoreReader, into copied: inout Copied) async {
        let (run, source, plan, existing, experimentID) = (planned.run, planned.source, planned.plan, planned.existing, planned.experimentID)
        let runID = run.info.runID
        let sourceParent = source.tags["mlflow.parentRunId"]
        let handle = Self.handle(runID)
        if let existing {
            bind(handle, to: existing.runID, experimentID: experimentID, name: run.info.name, status: existing.status)
            if !plan.tags.isEmpty { enqueue(handle, runID, .log(LogBatch(tags: plan.tags))) }
        } else {
            var tags = plan.tags
            tags["armory.handle"] = handle  // lets a create that may have reached the server be found, not repeated
            // The parent link: the uploader adds the parent's id once the parent exists (it may be
            // created by this very sync); a parent that already existed is bound by id.
            if let sourceParent, let parentID = copied.destinationIDs[sourceParent] {
                bind(Self.handle(sourceParent), to: parentID, experimentID: experimentID, name: "", status: .running)
            }
            var creation = RunCreation(
                handle: handle, runID: nil, experimentName: "", name: run.info.name, userID: run.info.userID,
                startTime: run.info.startTime, tags: tags, parentHandle: sourceParent.map { Self.handle($0) })
            creation.experimentID = experimentID
            creation.ownerUID = getuid()
            enqueue(handle, runID, .createRun(creation))
        }
        for chunk in Array(plan.params).chunked(100) {
            enqueue(handle, runID, .log(LogBatch(params: StringMap(uniqueKeysWithValues: chunk.map { ($0.key, $0.value) }))))
        }
        for metric in plan.metrics {
            // Only the points counted at planning: a run still growing gets the rest next time.
            guard let stream = reader.metricStream(of: run, key: metric.key, from: metric.from) else { continue }
            var left = metric.count
            while left > 0, !Task.isCancelled, let points = stream.next(upTo: min(left, 1000)) {
                left -= points.count
                enqueue(handle, runID, .log(LogBatch(metrics: points)))
                progress.withLock { $0.metricsQueued += Int64(points.count) }
                await pace(&copied)
            }
        }
        // Artifacts go up several at once: the scheduler sends a run's artifacts on as many lanes
        // as the destination takes calls.
        for path in plan.artifacts where !Task.isCancelled {
            let spool = spoolDirectory + "/sync-" + RunIDs.newRunID()
            let file = reader.artifactFile(of: run, path: path)
            // A hard link costs nothing; across file systems, a streamed copy.
            if link(file, spool) != 0 {
                do { try FileManager.default.copyItem(atPath: file, toPath: spool) } catch {
                    fail(runID, "cannot read artifact \(path): \(error.localizedDescription)")
                    continue
                }
            }
            let bytes = source.artifactBytes[path] ?? 0
            enqueue(handle, runID, .artifact(path: path, spoolPath: spool), bytes: bytes)
            progress.withLock { $0.artifactBytesQueued += Int64(bytes) }
            await pace(&copied)
        }
        if let status = plan.status { enqueue(handle, runID, .updateRun(status: status.status, endTime: status.endTime)) }
        if !plan.seal.isEmpty { copied.toSeal.append((runID, handle, plan.seal)) }
        await pace(&copied)
        progress.withLock {
            $0.runsDone += 1
            if plan.create { $0.runsCreated += 1 }
        }
    }

    /// Binds an uploader handle to a run the destination already holds.
    private func bind(_ handle: String, to runID: String, experimentID: String, name: String, status: RunStatus) {
        uploader.attach(
            RunEntry(
                handle: handle, runID: runID, experimentID: experimentID, experimentName: "", name: name,
                ownerUID: getuid(), status: status, parentHandle: nil, params: [:], connection: nil, clientPID: 0))
    }

    /// Queues one record of a run's copy; a rejection fails that run (it is not marked complete).
    private func enqueue(_ handle: String, _ runID: String, _ record: SinkRecord, bytes: Int = 0) {
        let metrics = record.metricCount
        let enqueued = uploader.enqueue(handle, record) { [weak self] result in
            switch result {
            case .success:
                self?.progress.withLock {
                    $0.metricsLanded += Int64(metrics)
                    $0.artifactBytesLanded += Int64(bytes)
                }
            case .failure(let error): self?.fail(runID, error.message)
            }
        }
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
    static func handle(_ sourceRunID: String) -> String { RecordOrigin.syncHandle(sourceRunID) }

    /// The store's identity: `<root>/.armory-store-id`, created on first use when the store is
    /// writable (a copy carried to another host keeps it), else the store's path.
    static func storeIdentity(_ reader: FileStoreReader) -> String {
        let file = reader.root + "/.armory-store-id"
        if let text = try? String(contentsOfFile: file, encoding: .utf8), !text.isEmpty {
            return text.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        let fresh = RunIDs.newRunID()
        if (try? fresh.write(toFile: file, atomically: true, encoding: .utf8)) != nil { return fresh }
        return reader.root
    }
}

/// The daemon's sync jobs, newest last: a service of the daemon's group that runs each job as a
/// child task, and cancels them at a graceful shutdown (after the listener closed, before the
/// uploaders drain; what a job queued stays in the journal, and its next run resumes).
public final class SyncJobs: Service, Sendable {
    private let jobs = Mutex<[SyncJob]>([])
    private let submissions: AsyncStream<SyncJob>
    private let submit: AsyncStream<SyncJob>.Continuation
    /// The daemon's own local store (the default source), when it has one.
    public let localStore: String?

    public init(localStore: String?) {
        self.localStore = localStore
        (submissions, submit) = AsyncStream.makeStream(of: SyncJob.self)
    }

    public var all: [SyncJob] { jobs.withLock { $0 } }

    /// Queues a job to run and returns it (a stopping daemon runs it no more: it reports that).
    func start(_ request: SyncRequest, source: String, uploader: Uploader, spoolDirectory: String, logger: Logger) -> SyncJob {
        let job = jobs.withLock { all -> SyncJob in
            let job = SyncJob(id: all.count + 1, request: request, source: source, uploader: uploader, spoolDirectory: spoolDirectory, logger: logger)
            all.append(job)
            return job
        }
        if case .terminated = submit.yield(job) { job.stopped() }
        return job
    }

    public func run() async {
        await withGracefulShutdownHandler {
            await withDiscardingTaskGroup { group in
                for await job in submissions { group.addTask { await job.run() } }
                group.cancelAll()
            }
        } onGracefulShutdown: {
            self.submit.finish()
        }
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
