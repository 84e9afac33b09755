/// A sync job as `sync` and `sync_status` answer it (`proto/schemas/sync-reply.json`): the
/// daemon builds it, `armoryctl sync` and `armoryctl status` read it.
public struct SyncJobStatus: Sendable, Equatable {
    public var id: Int64
    /// `planning`, `copying`, `uploading`, `complete` or `failed`.
    public var state: String
    public var from: String
    public var to: String
    public var dryRun: Bool
    public var runsTotal: Int64
    public var runsDone: Int64
    public var runsCreated: Int64
    public var runsUpToDate: Int64
    /// Planned so far (grows as runs are planned), queued for upload, confirmed by the destination.
    public var metricsTotal: Int64
    public var metricsQueued: Int64
    public var metricsLanded: Int64
    public var artifactBytesTotal: Int64
    public var artifactBytesQueued: Int64
    public var artifactBytesLanded: Int64
    /// The job's records not yet settled by the destination.
    public var pendingRecords: Int64
    /// Params the destination holds with another value, one line each.
    public var conflicts: [String]
    /// Runs not copied whole, and why.
    public var failures: [String]
    public var error: String?
    /// Per run: what its plan sends (`source_run`, `destination_run`, `created`, counts).
    public var runs: [JSONValue]

    /// Whether the job has ended (complete or failed).
    public var isFinished: Bool { state == "complete" || state == "failed" }

    public init(
        id: Int64, state: String, from: String, to: String, dryRun: Bool = false, runsTotal: Int64 = 0, runsDone: Int64 = 0, runsCreated: Int64 = 0,
        runsUpToDate: Int64 = 0, metricsTotal: Int64 = 0, metricsQueued: Int64 = 0, metricsLanded: Int64 = 0, artifactBytesTotal: Int64 = 0,
        artifactBytesQueued: Int64 = 0, artifactBytesLanded: Int64 = 0, pendingRecords: Int64 = 0, conflicts: [String] = [], failures: [String] = [],
        error: String? = nil, runs: [JSONValue] = []
    ) {
        self.id = id
        self.state = state
        self.from = from
        self.to = to
        self.dryRun = dryRun
        self.runsTotal = runsTotal
        self.runsDone = runsDone
        self.runsCreated = runsCreated
        self.runsUpToDate = runsUpToDate
        self.metricsTotal = metricsTotal
        self.metricsQueued = metricsQueued
        self.metricsLanded = metricsLanded
        self.artifactBytesTotal = artifactBytesTotal
        self.artifactBytesQueued = artifactBytesQueued
        self.artifactBytesLanded = artifactBytesLanded
        self.pendingRecords = pendingRecords
        self.conflicts = conflicts
        self.failures = failures
        self.error = error
        self.runs = runs
    }

    public var json: JSONObject {
        [
            "id": .int(id), "state": .string(state), "from": .string(from), "to": .string(to), "dry_run": .bool(dryRun),
            "runs_total": .int(runsTotal), "runs_done": .int(runsDone), "runs_created": .int(runsCreated), "runs_up_to_date": .int(runsUpToDate),
            "metrics_total": .int(metricsTotal), "metrics_queued": .int(metricsQueued), "metrics_landed": .int(metricsLanded),
            "artifact_bytes_total": .int(artifactBytesTotal), "artifact_bytes_queued": .int(artifactBytesQueued),
            "artifact_bytes_landed": .int(artifactBytesLanded), "pending_records": .int(pendingRecords),
            "conflicts": .array(conflicts.map { .string($0) }), "failures": .array(failures.map { .string($0) }),
            "error": error.map { .string($0) } ?? .null, "runs": .array(runs),
        ]
    }

    /// Reads a job; nil without its `id`.
    public init?(json o: JSONObject) {
        guard let id = o["id"]?.intValue else { return nil }
        func int(_ key: String) -> Int64 { o[key]?.intValue ?? 0 }
        func strings(_ key: String) -> [String] { (o[key]?.arrayValue ?? []).compactMap(\.stringValue) }
        self.init(
            id: id, state: o["state"]?.stringValue ?? "", from: o["from"]?.stringValue ?? "", to: o["to"]?.stringValue ?? "",
            dryRun: o["dry_run"]?.boolValue ?? false, runsTotal: int("runs_total"), runsDone: int("runs_done"), runsCreated: int("runs_created"),
            runsUpToDate: int("runs_up_to_date"), metricsTotal: int("metrics_total"), metricsQueued: int("metrics_queued"),
            metricsLanded: int("metrics_landed"), artifactBytesTotal: int("artifact_bytes_total"), artifactBytesQueued: int("artifact_bytes_queued"),
            artifactBytesLanded: int("artifact_bytes_landed"), pendingRecords: int("pending_records"), conflicts: strings("conflicts"),
            failures: strings("failures"), error: o["error"]?.stringValue, runs: o["runs"]?.arrayValue ?? [])
    }

    /// The jobs of a `sync_status` reply, or the job of a `sync` reply.
    public static func jobs(in reply: JSONObject) -> [SyncJobStatus] {
        let all = reply["jobs"]?.arrayValue ?? reply["job"].map { [$0] } ?? []
        return all.compactMap(\.objectValue).compactMap(SyncJobStatus.init(json:))
    }
}
