import ArgumentParser
import ArmoryProtocol
import ArmoryTrack
import Foundation

extension ArmoryCtl {
    /// `armoryctl sync`: copy local runs into an MLflow server, exactly once, in the daemon.
    struct Sync: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Copy runs of a local store into an MLflow server: exactly once, resumable, in the background.",
            discussion: """
                The daemon copies experiments (by name), runs with their status and times, params, tags, every metric point \
                and artifacts, keeping nested runs' parent links. Each copy carries the tag armory.sync.source_run, so a \
                later sync (from this host or another) finds it and sends only what is missing; armory.sync.state is \
                'partial' until a run is complete. Credentials: MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN of this shell. \
                Interrupting armoryctl leaves the sync running: `armoryctl sync --status` shows it.
                Exit status: 0 complete, 1 failed or param conflicts, 3 no daemon.
                """)

        @OptionGroup var options: ConnectionOptions

        @Option(help: "The MLflow server to copy into (http(s)://…).")
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
            if !status && to == nil { throw ValidationError("Name the destination: --to http(s)://… (or --status).") }
        }

        func run() throws {
            if status {
                let jobs = try request(.syncStatus, connection: options.connect())["jobs"]?.arrayValue ?? []
                if options.json { return options.printJSON(.object(["jobs": .array(jobs)])) }
                if jobs.isEmpty { print("no sync since the daemon started") }
                for job in jobs { print(Self.describe(job)) }
                return
            }
            // The destination and its credentials travel in hello, as a client's own MLflow server does.
            var environment = ProcessInfo.processInfo.environment
            environment["ARMORY_TRACKING_URI"] = to
            let connection: Connection
            do { connection = try Connection(socketPath: options.socket, client: "armoryctl", environment: environment) } catch {
                FileHandle.standardError.write(Data("armoryctl: \(error)\n".utf8))
                throw ExitCode(3)
            }
            let started = try request(.sync(SyncRequest(from: from.map(Self.absolute), experiments: experiments, runs: runs, dryRun: dryRun)), connection: connection)
            guard let id = started["job"]?["id"]?.intValue else { throw ValidationError("armoryd sent no sync job.") }
            let progress = ProgressBar(enabled: !options.json && isatty(STDERR_FILENO) == 1)
            var job = started["job"]!
            while !["complete", "failed"].contains(job["state"]?.stringValue ?? "") {
                progress.show(done: Self.fraction(job), text: Self.describe(job))
                Thread.sleep(forTimeInterval: 0.25)
                job = try request(.syncStatus, connection: connection)["jobs"]?.arrayValue?.first { $0["id"]?.intValue == id } ?? job
            }
            progress.finish()
            if options.json { options.printJSON(job) } else { print(Self.describe(job)) }
            for conflict in job["conflicts"]?.arrayValue ?? [] { FileHandle.standardError.write(Data("armoryctl: \(conflict.stringValue ?? "")\n".utf8)) }
            if job["state"]?.stringValue == "failed" || !(job["conflicts"]?.arrayValue ?? []).isEmpty { throw ExitCode(1) }
        }

        private func request(_ op: ClientOp, connection: Connection) throws -> JSONObject {
            do { return try connection.request(op) } catch {
                FileHandle.standardError.write(Data("armoryctl: \(error)\n".utf8))
                throw ExitCode(1)
            }
        }

        static func absolute(_ path: String) -> String {
            path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
        }

        static func fraction(_ job: JSONValue) -> Double {
            let total = Double(job["runs_total"]?.intValue ?? 0)
            return total > 0 ? Double(job["runs_done"]?.intValue ?? 0) / total : 0
        }

        /// One line: state, runs, metrics, bytes.
        static func describe(_ job: JSONValue) -> String {
            let state = job["state"]?.stringValue ?? "?"
            var line = "sync \(job["id"]?.intValue ?? 0) \(state): \(job["runs_done"]?.intValue ?? 0)/\(job["runs_total"]?.intValue ?? 0) runs"
            line += " (\(job["runs_created"]?.intValue ?? 0) created, \(job["runs_up_to_date"]?.intValue ?? 0) up to date)"
            line += ", \(job["metrics_queued"]?.intValue ?? 0) metrics, \(job["artifact_bytes_queued"]?.intValue ?? 0) artifact bytes"
            if let pending = job["pending_records"]?.intValue, pending > 0 { line += ", \(pending) records still uploading" }
            line += "  \(job["from"]?.stringValue ?? "") -> \(job["to"]?.stringValue ?? "")"
            if let error = job["error"]?.stringValue { line += "\n  error: \(error)" }
            return line
        }
    }
}
