import ArgumentParser
import ArmoryProtocol
import ArmoryTrack
import Foundation

extension ArmoryCtl {
    /// `armoryctl sync`: copy local runs into an MLflow server or another store, exactly once, in the daemon.
    struct Sync: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Copy runs of a local store into an MLflow server or another store: exactly once, resumable, in the background.",
            discussion: """
                The daemon copies experiments (by name), runs with their status and times, params, tags, every metric point \
                and artifacts, keeping nested runs' parent links. Each copy carries the tag armory.sync.source_run, so a \
                later sync (from this host or another) finds it and sends only what is missing; armory.sync.state is \
                'partial' until a run is complete. Credentials: MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN of this shell. \
                Interrupting armoryctl leaves the sync running: `armoryctl sync --status` shows it. A local store as \
                destination (--to PATH) must be writable by the daemon's user.
                Exit status: 0 complete, 1 failed or param conflicts, 3 no daemon.
                """)

        @OptionGroup var options: ConnectionOptions

        @Option(help: "Where to copy: an MLflow server (http(s)://…) or another local store (a path or file:///…).")
        var to: String?

        @Option(help: "The store to copy from (default: the daemon's own local store).")
        var from: String?

        @Option(name: .customLong("experiment"), help: "Only this experiment (by name); repeatable.")
        var experiments: [String] = []

        @Option(name: .customLong("run"), help: "Only this run (by id; its parents come along); repeatable.")
        var runs: [String] = []

        @Flag(help: "Show what would be copied; send nothing.")
        var dryRun = false

        @Flag(help: "Show the daemon's sync jobs and exit.")
        var status = false

        func validate() throws {
            if !status && to == nil { throw ValidationError("Name the destination: --to http(s)://… or --to PATH (or --status).") }
        }

        func run() throws {
            if status {
                let jobs = SyncJobStatus.jobs(in: try options.request(.syncStatus, connection: options.connect()))
                if options.json { return options.printJSON(.object(["jobs": .array(jobs.map { .object($0.json) })])) }
                if jobs.isEmpty { print("no sync since the daemon started") }
                for job in jobs { print(Self.describe(job)) }
                return
            }
            // The destination and its credentials travel in hello, as a client's own MLflow server does.
            var environment = ProcessInfo.processInfo.environment
            environment["ARMORY_TRACKING_URI"] = to.map { $0.contains(":") ? $0 : "file://" + Self.absolute($0) }
            let connection = try options.connect(environment: environment)
            let request = SyncRequest(from: from.map(Self.absolute), experiments: experiments, runs: runs, dryRun: dryRun)
            guard var job = SyncJobStatus.jobs(in: try options.request(.sync(request), connection: connection)).first else {
                throw ValidationError("armoryd sent no sync job.")
            }
            let progress = ProgressBar(enabled: !options.json && isatty(STDERR_FILENO) == 1)
            var rate = SyncRate()
            while !job.isFinished {
                rate.observe(job, at: Date())
                progress.show(done: SyncRate.fraction(job), text: rate.text(job))
                Thread.sleep(forTimeInterval: 0.25)
                let id = job.id
                job = SyncJobStatus.jobs(in: try options.request(.syncStatus, connection: connection)).first { $0.id == id } ?? job
            }
            progress.finish()
            if options.json { options.printJSON(.object(job.json)) } else { print(Self.describe(job, problems: false)) }
            let problems = job.conflicts + job.failures.map { "not copied: " + $0 } + [job.error.map { "sync failed: " + $0 }].compactMap { $0 }
            for problem in problems { FileHandle.standardError.write(Data("armoryctl: \(problem)\n".utf8)) }
            if job.state == "failed" || !job.conflicts.isEmpty { throw ExitCode(1) }
        }

        static func absolute(_ path: String) -> String {
            path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
        }

        /// One line: state, runs, metrics, bytes, where from and to; then, with `problems`, what
        /// was not copied and why.
        static func describe(_ job: SyncJobStatus, problems: Bool = true) -> String {
            var line = "sync \(job.id) \(job.state): \(job.runsDone)/\(job.runsTotal) runs"
            line += " (\(job.runsCreated) created, \(job.runsUpToDate) up to date)"
            line += ", \(job.metricsLanded)/\(job.metricsTotal) metrics"
            if job.artifactBytesTotal > 0 {
                line += ", \(SyncRate.bytes(Int(job.artifactBytesLanded)))/\(SyncRate.bytes(Int(job.artifactBytesTotal))) of artifacts"
            }
            if job.pendingRecords > 0 { line += ", \(job.pendingRecords) records uploading" }
            line += "  \(job.from) -> \(job.to)"
            guard problems else { return line }
            for failure in job.failures { line += "\n  not copied: \(failure)" }
            if let error = job.error { line += "\n  error: \(error)" }
            return line
        }
    }
}

/// The rate and time left of a sync, from the landed counts of successive polls. Metrics and
/// artifact bytes are one amount of work: a metric counts as the 64 bytes it takes on the wire.
struct SyncRate {
    private var last: (at: Date, metrics: Int, bytes: Int)?
    private var metricsPerSecond = 0.0
    private var bytesPerSecond = 0.0

    static let bytesPerMetric = 64.0

    static func fraction(_ job: SyncJobStatus) -> Double {
        let total = Double(job.metricsTotal) * bytesPerMetric + Double(job.artifactBytesTotal)
        let done = Double(job.metricsLanded) * bytesPerMetric + Double(job.artifactBytesLanded)
        return total > 0 ? done / total : 0
    }

    /// Takes one poll in: rates are smoothed over about two seconds.
    mutating func observe(_ job: SyncJobStatus, at now: Date) {
        let metrics = Int(job.metricsLanded)
        let bytes = Int(job.artifactBytesLanded)
        if let last, case let elapsed = now.timeIntervalSince(last.at), elapsed > 0 {
            let weight = min(1, elapsed / 2)
            let metricRate = Double(metrics - last.metrics) / elapsed
            let byteRate = Double(bytes - last.bytes) / elapsed
            metricsPerSecond += weight * (metricRate - metricsPerSecond)
            bytesPerSecond += weight * (byteRate - bytesPerSecond)
        }
        last = (now, metrics, bytes)
    }

    /// What the progress bar shows after its percentage, most wanted first (a narrow terminal
    /// cuts the end): `0:42 left · copying 3/6 runs · 40000/120000 metrics · 1.2 GB/3.4 GB · 12000 metrics/s · 40.0 MB/s`.
    func text(_ job: SyncJobStatus) -> String {
        let artifacts = job.artifactBytesTotal > 0
        var parts = ["\(job.state) \(job.runsDone)/\(job.runsTotal) runs", "\(job.metricsLanded)/\(job.metricsTotal) metrics"]
        if artifacts { parts.append("\(Self.bytes(Int(job.artifactBytesLanded)))/\(Self.bytes(Int(job.artifactBytesTotal)))") }
        if last != nil, metricsPerSecond > 0 || bytesPerSecond > 0 {
            parts.append("\(Int(metricsPerSecond)) metrics/s")
            if artifacts { parts.append("\(Self.bytes(Int(bytesPerSecond)))/s") }
            let total = Double(job.metricsTotal) * Self.bytesPerMetric + Double(job.artifactBytesTotal)
            let left = total * (1 - Self.fraction(job)) / (metricsPerSecond * Self.bytesPerMetric + bytesPerSecond)
            if left.isFinite, job.state != "planning" { parts.insert("\(Int(left) / 60):\(String(format: "%02d", Int(left) % 60)) left", at: 0) }
        }
        return parts.joined(separator: " · ")
    }

    static func bytes(_ n: Int) -> String {
        let units = ["B", "KB", "MB", "GB", "TB"]
        var value = Double(n)
        var unit = 0
        while value >= 1000 && unit < units.count - 1 {
            value /= 1000
            unit += 1
        }
        return unit == 0 ? "\(n) B" : String(format: "%.1f %@", value, units[unit])
    }
}
