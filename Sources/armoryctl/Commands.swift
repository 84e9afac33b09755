import ArgumentParser
import ArmoryProtocol
import ArmoryTrack
import Foundation
import MLflow

extension ArmoryCtl {
    /// `armoryctl runs`: the active runs and what each still has to upload.
    struct Runs: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List active runs: owner, client, evaluation and chain, MLflow run id (or pending), backlog.")

        @OptionGroup var options: ConnectionOptions

        @Flag(help: "List the records destinations refused for good instead (as `armoryctl errors`).")
        var errors = false

        func run() throws {
            if errors { return try Errors.show(options: options, runID: nil, retry: false) }
            let status = try options.status(options.connect())
            if options.json { return options.printJSON(status.json["active_runs"] ?? .array([])) }
            guard !status.activeRuns.isEmpty else { return print("no active runs") }
            let header = ["RUN ID", "EXPERIMENT", "RUN", "OWNER UID", "CLIENT PID", "BACKLOG", "UPLOAD", "CLIENT"]
            let rows = status.activeRuns.map { r in
                [r.runID ?? "pending", r.experiment, r.name, "\(r.ownerUID)", "\(r.clientPID)", "\(r.pendingRecords)", r.upload, r.connected ? "connected" : "gone"]
            }
            print(Table.render(header: header, rows: rows))
        }
    }

    /// `armoryctl flush`: waits until what is queued has reached the destinations.
    struct Flush: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show the backlog; with --wait, wait until it is uploaded (a progress bar in a terminal).",
            discussion: "Exit status: 0 drained (or, without --wait, shown), 1 still pending at --timeout, 3 not running.")

        @OptionGroup var options: ConnectionOptions

        @Flag(help: "Wait until every destination's backlog is uploaded.")
        var wait = false

        @Option(parsing: .unconditional, help: "Seconds --wait waits at most (0 or more).")
        var timeout: Double = 600

        func validate() throws {
            try Validate.seconds(timeout, flag: "--timeout")
        }

        func run() throws {
            let connection = try options.connect()
            var status = try options.status(connection)
            let start = Date()
            let initial = max(1, status.pendingRecords)
            let progress = ProgressBar(enabled: wait && !options.json && isatty(STDERR_FILENO) == 1)
            while wait, status.pendingRecords > 0, Date().timeIntervalSince(start) < timeout {
                let pending = status.pendingRecords
                progress.show(
                    done: Double(initial - pending) / Double(initial),
                    text: "\(pending) records pending, \(status.writeRateMetricsPerSecond) metrics/s")
                Thread.sleep(forTimeInterval: 0.25)
                status = try options.status(connection)
            }
            progress.finish()
            let pending = status.pendingRecords
            let result: JSONObject = [
                "pending_records": .int(pending), "drained": .bool(pending == 0),
                "seconds": .double((Date().timeIntervalSince(start) * 10).rounded() / 10),
            ]
            if options.json {
                options.printJSON(.object(result))
            } else {
                print(pending == 0 ? "backlog drained" : "\(pending) records pending")
            }
            if wait, pending > 0 { throw ExitCode(1) }
        }
    }

    /// `armoryctl errors`: what the destinations refused for good (dead letters), and sending it again.
    struct Errors: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List the records destinations refused for good (dead letters); --retry sends them again.",
            discussion: """
                A record a destination refuses (a deleted experiment, a value over the server's limit, a changed param) is                 split until only the refused entities are left; those are kept, one JSON line each, in                 <state>/dead-letters/<destination>.jsonl, and their client is told. Once the cause is fixed (for example                 `mlflow experiments restore`), --retry queues them again: those that land leave the file, those refused                 again stay. Users see their own; root and the daemon's user see everyone's.
                Exit status: 0 none (or re-queued), 1 there are dead letters, 3 not running.
                """)

        @OptionGroup var options: ConnectionOptions

        @Option(name: .customLong("run"), help: "Only the records of this run (its MLflow run id).")
        var runID: String?

        @Flag(help: "Queue the listed records again (after fixing the cause).")
        var retry = false

        func run() throws {
            try Self.show(options: options, runID: runID, retry: retry)
        }

        /// Lists the dead letters (of one run), or re-queues them; also `armoryctl runs --errors`.
        static func show(options: ConnectionOptions, runID: String?, retry: Bool) throws {
            let reply = try options.request(.deadLetters(runID: runID, retry: retry), connection: options.connect())
            let letters = reply["dead_letters"]?.arrayValue ?? []
            if options.json { return options.printJSON(.object(reply)) }
            if retry { return print("re-queued \(letters.count) record\(letters.count == 1 ? "" : "s"); those refused again come back (armoryctl errors)") }
            guard !letters.isEmpty else { return print("no dead letters") }
            let rows = letters.map { line -> [String] in
                let time = Date(timeIntervalSince1970: Double(line["time_ms"]?.intValue ?? 0) / 1000)
                let status = [line["http_status"]?.intValue.map { String($0) }, line["error_code"]?.stringValue].compactMap { $0 }.joined(separator: " ")
                return [
                    timestamp.string(from: time), line["run_id"]?.stringValue ?? "(not created)", "\(line["uid"]?.intValue ?? 0)",
                    describe(line["record"]), status.isEmpty ? line["code"]?.stringValue ?? "" : status, String((line["message"]?.stringValue ?? "").prefix(100)),
                ]
            }
            print(Table.render(header: ["TIME", "RUN ID", "UID", "RECORD", "STATUS", "MESSAGE"], rows: rows))
            let files = (reply["files"]?.arrayValue ?? []).compactMap(\.stringValue).filter { FileManager.default.fileExists(atPath: $0) }
            print("\n\(letters.count) dead letter\(letters.count == 1 ? "" : "s") in \(files.joined(separator: ", ")); fix the cause, then: armoryctl errors --retry")
            throw ExitCode(1)
        }

        private static let timestamp: DateFormatter = {
            let f = DateFormatter()
            f.dateFormat = "yyyy-MM-dd HH:mm:ss"
            return f
        }()

        /// A record in a few words: `log: 3 metrics (acc), 1 param`, `artifact model.pkl`.
        static func describe(_ record: JSONValue?) -> String {
            switch record?["kind"]?.stringValue {
            case "log":
                let metrics = record?["metrics"]?.arrayValue ?? []
                let keys = Set(metrics.compactMap { $0.arrayValue?.first?.stringValue }).sorted()
                let params = record?["params"]?.objectValue?.keys.sorted() ?? []
                let tags = record?["tags"]?.objectValue?.keys.sorted() ?? []
                return [
                    metrics.isEmpty ? nil : "\(metrics.count) metrics (\(keys.prefix(3).joined(separator: ", ")))",
                    params.isEmpty ? nil : "params \(params.prefix(3).joined(separator: ", "))",
                    tags.isEmpty ? nil : "tags \(tags.prefix(3).joined(separator: ", "))",
                ].compactMap { $0 }.joined(separator: "; ")
            case "create_run": return "create run '\(record?["name"]?.stringValue ?? "")'"
            case "update_run": return "end run \(record?["status"]?.stringValue ?? "")"
            case "artifact": return "artifact \(record?["path"]?.stringValue ?? "")"
            case "delete_tag": return "delete tag \(record?["key"]?.stringValue ?? "")"
            default: return "?"
            }
        }
    }

    /// `armoryctl metrics`: the daemon's counters in Prometheus' text format.
    struct Metrics: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print the daemon's counters in Prometheus' text exposition format (for a textfile collector or a scrape).")

        @OptionGroup var options: ConnectionOptions

        func run() throws {
            let status = try options.status(options.connect())
            if options.json { return options.printJSON(.object(status.json)) }
            print(PrometheusText.render(status), terminator: "")
        }
    }

    /// `armoryctl mlflow-server`: MLflow's own UI on the local store.
    struct MLflowServer: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "mlflow-server",
            abstract: "Start MLflow's UI on the local store (extra arguments go to `mlflow server`).")

        @OptionGroup var options: ConnectionOptions

        @Option(help: "The store to show (default: the running daemon's local store, else $ARMORY_HOME/mlruns or ~/.armory/mlruns).")
        var store: String?

        @Option(parsing: .unconditional, help: "Port for the UI (1-65535).")
        var port: Int = 5000

        func validate() throws {
            guard (1...65535).contains(port) else { throw ValidationError("--port must be a TCP port, 1-65535 (got \(port)).") }
        }

        @Argument(parsing: .captureForPassthrough, help: "Arguments passed to `mlflow server` as they are.")
        var mlflowArguments: [String] = []

        func run() throws {
            let root = try store ?? daemonStore() ?? Self.defaultStore()
            guard FileManager.default.fileExists(atPath: root) else {
                throw Failure("No MLflow store at \(root): run an evaluation first, or pass --store PATH.")
            }
            guard let mlflow = Self.findExecutable("mlflow") else {
                throw Failure("`mlflow` is not installed (or not on PATH): `pip install \"mlflow==3.17.2\"` (or activate the virtual environment that has it), then run this again.")
            }
            let arguments = [mlflow, "server", "--backend-store-uri", "file://" + root, "--host", "127.0.0.1", "--port", "\(port)"] + mlflowArguments
            setenv("MLFLOW_ALLOW_FILE_STORE", "true", 1)
            let ui = "http://127.0.0.1:\(port)"
            FileHandle.standardError.write(Data(("armoryctl: MLflow UI on \(ui) for \(root)\n" + Self.experimentLinks(store: root, ui: ui)).utf8))
            let argv = arguments.map { strdup($0) } + [nil]
            execv(mlflow, argv)
            throw Failure("Cannot start \(mlflow): \(String(cString: strerror(errno))).")
        }

        /// The running daemon's store, when it writes a local one.
        private func daemonStore() throws -> String? {
            guard let connection = try? Connection(socketPath: options.socket, client: "armoryctl", admin: true),
                let destination = try? connection.status()["destination"]?.stringValue,  // not read as a whole: any daemon version says this
                destination.hasPrefix("file://")
            else { return nil }
            return String(destination.dropFirst("file://".count))
        }

        /// How many experiments get a link of their own.
        static let linkedExperiments = 10

        /// A link per experiment that opens it on its runs table. MLflow 3.17's UI picks an
        /// experiment's page from its global "GenAI / Model training" switch (the `workflowType`
        /// URL parameter, else the browser's last choice, else GenAI), not from the experiment's
        /// `mlflow.experimentKind` tag, so a plain link opens on an empty traces page.
        static func experimentLinks(store: String, ui: String) -> String {
            guard let reader = try? FileStoreReader(root: store) else { return "" }
            let experiments = reader.experiments().filter { !$0.isDeleted && !($0.id == "0" && reader.runs(of: $0).isEmpty) }
            guard !experiments.isEmpty else { return "" }
            var text = "Experiments, on their runs:\n"
            for experiment in experiments.sorted(by: { $0.name < $1.name }).prefix(linkedExperiments) {
                text += "  \(experiment.name): \(ui)/#/experiments/\(experiment.id)?workflowType=machine_learning\n"
            }
            if experiments.count > linkedExperiments {
                text += "  (\(experiments.count - linkedExperiments) more: open one, then choose \"Model training\" at the top left, which the browser keeps)\n"
            }
            return text
        }

        static func defaultStore() -> String {
            let home = ProcessInfo.processInfo.environment["ARMORY_HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? (NSHomeDirectory() + "/.armory")
            return home + "/mlruns"
        }

        static func findExecutable(_ name: String) -> String? {
            let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
            return path.split(separator: ":").map { "\($0)/\(name)" }.first { access($0, X_OK) == 0 }
        }
    }
}

extension ArmoryCtl {
    /// `armoryctl stop`: stops a daemon started by hand, as `systemctl stop` stops a unit.
    struct Stop: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Stop a daemon started by hand (SIGTERM, then wait until it has exited); one under systemd is stopped with systemctl.",
            discussion: "The daemon finishes what it holds (journaled records stay for its next start). Exit status: 0 stopped, 1 still running at --timeout or managed by systemd, 3 not running, 4 not permitted.")

        @OptionGroup var options: ConnectionOptions

        @Option(parsing: .unconditional, help: "Seconds to wait for the daemon to exit (0 or more).")
        var timeout: Double = 30

        func validate() throws {
            try Validate.seconds(timeout, flag: "--timeout")
        }

        func run() throws {
            let status = try options.status(options.connect())
            let pid = status.pid
            if let (unit, user) = status.systemdUnit.map({ ($0.name, $0.user ? " --user" : "") }) {
                throw Failure(
                    "armoryd (pid \(pid)) runs under systemd as \(unit): stop it with `systemctl\(user) stop \(unit)` (its socket starts it again on the next connection; stop \(unit.replacingOccurrences(of: ".service", with: ".socket")) too to keep it stopped)."
                )
            }
            guard pid > 0 else { throw Failure("armoryd did not say its pid; stop it with kill.") }
            if kill(pid, SIGTERM) != 0 {
                let reason = String(cString: strerror(errno))
                throw Failure("Cannot stop armoryd (pid \(pid), uid \(status.uid)): \(reason). Run armoryctl stop as the daemon's user or as root.", exitCode: errno == EPERM ? 4 : 1)
            }
            let deadline = Date().addingTimeInterval(timeout)
            while Self.isAlive(pid) {
                guard Date() < deadline else {
                    throw Failure("armoryd (pid \(pid)) is still running \(Int(timeout)) s after SIGTERM (it flushes its journal first); wait, or `kill -9 \(pid)` (journaled records survive).")
                }
                Thread.sleep(forTimeInterval: 0.05)
            }
            if options.json { options.printJSON(.object(["stopped": .bool(true), "pid": .int(Int64(pid))])) } else { print("armoryd (pid \(pid)) stopped") }
        }

        /// Whether `pid` still runs: it exists and is not a zombie (exited, its parent has not reaped it yet).
        static func isAlive(_ pid: pid_t) -> Bool {
            guard kill(pid, 0) == 0 else { return false }
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
                let close = stat.lastIndex(of: ")")
            else { return true }
            return stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).first != "Z"
        }
    }
}

/// A command that could not do its job: the message goes to stderr, without the usage text.
struct Failure: Error, CustomStringConvertible {
    var description: String
    var exitCode: Int32

    init(_ message: String, exitCode: Int32 = 1) {
        self.description = message
        self.exitCode = exitCode
    }
}

/// Checks of option values, naming the flag and what it accepts.
enum Validate {
    static func seconds(_ value: Double, flag: String) throws {
        guard value >= 0, value.isFinite else { throw ValidationError("\(flag) must be a number of seconds, 0 or more (got \(String(format: "%g", value))).") }
    }
}

/// A fixed-width text table.
enum Table {
    static func render(header: [String], rows: [[String]]) -> String {
        let widths = header.indices.map { i in ([header] + rows).map { $0[i].count }.max() ?? 0 }
        func line(_ cells: [String]) -> String {
            zip(cells, widths).map { $0 + String(repeating: " ", count: $1 - $0.count) }.joined(separator: "  ").trimmingCharacters(in: .whitespaces)
        }
        return ([line(header)] + rows.map(line)).joined(separator: "\n")
    }
}

/// A one-line progress bar on stderr, redrawn in place.
struct ProgressBar {
    let enabled: Bool

    func show(done fraction: Double, text: String) {
        guard enabled else { return }
        let width = 30
        let filled = Int((min(1, max(0, fraction)) * Double(width)).rounded())
        let bar = String(repeating: "█", count: filled) + String(repeating: "░", count: width - filled)
        // One terminal line at most: a wrapped line would not be overwritten by the next `\r`.
        var size = winsize()
        let columns = ioctl(STDERR_FILENO, UInt(TIOCGWINSZ), &size) == 0 && size.ws_col > 0 ? Int(size.ws_col) : 200
        let line = "\(bar) \(Int(fraction * 100))%  \(text)"
        FileHandle.standardError.write(Data("\r\(line.prefix(max(columns - 1, width)))\u{1B}[K".utf8))
    }

    func finish() {
        if enabled { FileHandle.standardError.write(Data("\r\u{1B}[K".utf8)) }
    }
}

/// The status reply as Prometheus text: counters and gauges named `armoryd_*`.
enum PrometheusText {
    static func render(_ s: StatusReply) -> String {
        var out = ""
        func metric(_ name: String, _ type: String, _ help: String, _ samples: [(labels: String, value: Double)]) {
            out += "# HELP armoryd_\(name) \(help)\n# TYPE armoryd_\(name) \(type)\n"
            for sample in samples { out += "armoryd_\(name)\(sample.labels) \(format(sample.value))\n" }
        }
        func count(_ n: Int64) -> [(labels: String, value: Double)] { [("", Double(n))] }
        metric("up", "gauge", "1 when running, 0 when degraded.", [("", s.state == "running" ? 1 : 0)])
        metric("uptime_seconds", "gauge", "Seconds since the daemon started.", [("", s.uptimeSeconds)])
        metric("clients", "gauge", "Connected clients.", count(Int64(s.clients.count)))
        metric("sessions_attached", "gauge", "Client sessions carried by a connection.", count(s.sessions.attached))
        metric("sessions_waiting", "gauge", "Client sessions waiting for their client to resume them (after a restart or a broken connection).", count(s.sessions.waiting))
        metric("sessions_expired_total", "counter", "Sessions nobody resumed within --orphan-grace (their runs ended FAILED).", count(s.sessions.expired))
        metric("sessions_ended_total", "counter", "Sessions ended with their connection, with no wait for a resume (a client's bye on exit, or an admin tool's).", count(s.sessions.ended))
        metric("active_runs", "gauge", "Runs not yet ended.", count(Int64(s.activeRuns.count)))
        metric("pending_records", "gauge", "Records accepted (journaled) and not yet applied by their destination.", count(s.pendingRecords))
        metric("applied_records_total", "counter", "Records the destinations applied (a record: one frame's metrics, params and tags for a run, a run's creation or end, an artifact).", count(s.appliedRecords))
        metric("rejected_records_total", "counter", "Records the destinations refused for good (each reported to the client that sent it).", count(s.rejectedRecords))
        metric("dead_letters_total", "counter", "Refused records (down to the refused entities of a batch) written to the dead-letter files since the start; armoryctl errors lists them.", count(s.deadLetters))
        metric("metrics_accepted_total", "counter", "Metrics accepted from clients (valid and journaled); the daemon's own system/... samples are not counted here.", count(s.metricsAccepted))
        metric("metrics_written_total", "counter", "Metrics the destinations applied: the clients' and the system/... host metrics (see metrics_written_system_total).", count(s.metricsWritten))
        metric("metrics_written_system_total", "counter", "Of metrics_written_total, those named system/... (host metrics the daemon samples for each run, or a client's own monitor logs).", count(s.metricsWrittenSystem))
        metric("write_rate_metrics_per_second", "gauge", "Metrics written per second over the last ten seconds.", [("", s.writeRateMetricsPerSecond)])
        metric("frames_received_total", "counter", "Frames received from clients (requests and fire-and-forget ops, admin tools included).", count(s.framesReceived))
        metric(
            "errors_sent_total", "counter", "Errors sent back to clients: operations refused at once (bad keys or values, unknown handles, wrong states, oversized frames) and records a destination refused later. armoryctl status shows the latest.",
            count(s.errorsSent))
        metric("journal_bytes", "gauge", "Bytes of journal segments on disk.", count(s.journal.bytes))
        metric("journal_corrupt_records_total", "counter", "Corrupt journal records skipped at the last start.", count(s.journal.corruptRecords))
        let label = { (d: StatusReply.Destination) in "{destination=\"\(escape(d.destination))\"}" }
        metric("destination_pending_records", "gauge", "Records pending per destination.", s.destinations.map { (label($0), Double($0.pendingRecords)) })
        metric("destination_retries_total", "counter", "Retried sink calls per destination.", s.destinations.map { (label($0), Double($0.retries)) })
        metric("destination_healthy", "gauge", "1 when the destination's last call succeeded.", s.destinations.map { (label($0), $0.state == "running" ? 1 : 0) })
        metric(
            "destination_needs_credentials", "gauge", "1 while the destination refuses the credentials (401, 403): its records wait in the journal.",
            s.destinations.map { (label($0), $0.state == "needs-credentials" ? 1 : 0) })
        if let last = s.lastSuccessMs {
            metric("last_success_timestamp_seconds", "gauge", "When a destination last applied a call.", [("", Double(last) / 1000)])
        }
        return out
    }

    static func format(_ v: Double) -> String { v == v.rounded() && abs(v) < 1e15 ? String(Int64(v)) : String(v) }

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"").replacingOccurrences(of: "\n", with: "\\n")
    }
}
