import ArgumentParser
import ArmoryProtocol
import ArmoryTrack
import Foundation

extension ArmoryCtl {
    /// `armoryctl runs`: the active runs and what each still has to upload.
    struct Runs: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List active runs: owner, client, evaluation and chain, MLflow run id (or pending), backlog.")

        @OptionGroup var options: ConnectionOptions

        func run() throws {
            let runs = try options.status(options.connect())["active_runs"]?.arrayValue ?? []
            if options.json { return options.printJSON(.array(runs)) }
            guard !runs.isEmpty else { return print("no active runs") }
            let header = ["RUN ID", "EXPERIMENT", "RUN", "OWNER UID", "CLIENT PID", "BACKLOG", "CLIENT"]
            let rows = runs.map { r in
                [r["run_id"]?.stringValue ?? "pending", r["experiment"]?.stringValue ?? "", r["name"]?.stringValue ?? "",
                 "\(r["owner_uid"]?.intValue ?? 0)", "\(r["client_pid"]?.intValue ?? 0)", "\(r["pending_records"]?.intValue ?? 0)",
                 r["connected"]?.boolValue == true ? "connected" : "gone"]
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

        @Option(help: "Seconds --wait waits at most.")
        var timeout: Double = 600

        func run() throws {
            let connection = try options.connect()
            var status = try options.status(connection)
            let start = Date()
            let initial = max(1, status["pending_records"]?.intValue ?? 0)
            let progress = ProgressBar(enabled: wait && !options.json && isatty(STDERR_FILENO) == 1)
            while wait, (status["pending_records"]?.intValue ?? 0) > 0, Date().timeIntervalSince(start) < timeout {
                let pending = status["pending_records"]?.intValue ?? 0
                progress.show(done: Double(initial - pending) / Double(initial),
                              text: "\(pending) records pending, \(status["write_rate_metrics_per_s"]?.doubleValue ?? 0) metrics/s")
                Thread.sleep(forTimeInterval: 0.25)
                status = try options.status(connection)
            }
            progress.finish()
            let pending = status["pending_records"]?.intValue ?? 0
            let result: JSONObject = ["pending_records": .int(pending), "drained": .bool(pending == 0),
                                      "seconds": .double((Date().timeIntervalSince(start) * 10).rounded() / 10)]
            if options.json { options.printJSON(.object(result)) } else {
                print(pending == 0 ? "backlog drained" : "\(pending) records pending")
            }
            if wait, pending > 0 { throw ExitCode(1) }
        }
    }

    /// `armoryctl metrics`: the daemon's counters in Prometheus' text format.
    struct Metrics: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print the daemon's counters in Prometheus' text exposition format (for a textfile collector or a scrape).")

        @OptionGroup var options: ConnectionOptions

        func run() throws {
            let status = try options.status(options.connect())
            if options.json { return options.printJSON(.object(status)) }
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

        @Option(help: "Port for the UI.")
        var port: Int = 5000

        @Argument(parsing: .captureForPassthrough, help: "Arguments passed to `mlflow server` as they are.")
        var mlflowArguments: [String] = []

        func run() throws {
            let root = try store ?? daemonStore() ?? Self.defaultStore()
            guard FileManager.default.fileExists(atPath: root) else {
                throw ValidationError("No MLflow store at \(root): run an evaluation first, or pass --store PATH.")
            }
            guard let mlflow = Self.findExecutable("mlflow") else {
                throw ValidationError("`mlflow` is not installed (or not on PATH): `pip install \"mlflow==3.17.2\"` (or activate the virtual environment that has it), then run this again.")
            }
            let arguments = [mlflow, "server", "--backend-store-uri", "file://" + root, "--host", "127.0.0.1", "--port", "\(port)"] + mlflowArguments
            setenv("MLFLOW_ALLOW_FILE_STORE", "true", 1)
            FileHandle.standardError.write(Data("armoryctl: MLflow UI on http://127.0.0.1:\(port) for \(root)\n".utf8))
            let argv = arguments.map { strdup($0) } + [nil]
            execv(mlflow, argv)
            throw ValidationError("Cannot start \(mlflow): \(String(cString: strerror(errno)))")
        }

        /// The running daemon's store, when it writes a local one.
        private func daemonStore() throws -> String? {
            guard let connection = try? Connection(socketPath: options.socket, client: "armoryctl", resumesSession: false),
                  let destination = try? connection.status()["destination"]?.stringValue,
                  destination.hasPrefix("file://") else { return nil }
            return String(destination.dropFirst("file://".count))
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
    static func render(_ s: JSONObject) -> String {
        var out = ""
        func metric(_ name: String, _ type: String, _ help: String, _ samples: [(labels: String, value: Double)]) {
            out += "# HELP armoryd_\(name) \(help)\n# TYPE armoryd_\(name) \(type)\n"
            for sample in samples { out += "armoryd_\(name)\(sample.labels) \(format(sample.value))\n" }
        }
        func number(_ key: String) -> Double { s[key]?.doubleValue ?? Double(s[key]?.intValue ?? 0) }
        metric("up", "gauge", "1 when running, 0 when degraded.", [("", s["state"]?.stringValue == "running" ? 1 : 0)])
        metric("uptime_seconds", "gauge", "Seconds since the daemon started.", [("", number("uptime_s"))])
        metric("clients", "gauge", "Connected clients.", [("", Double(s["clients"]?.arrayValue?.count ?? 0))])
        let sessions = s["sessions"]
        metric("sessions_attached", "gauge", "Client sessions carried by a connection.", [("", Double(sessions?["attached"]?.intValue ?? 0))])
        metric("sessions_waiting", "gauge", "Client sessions waiting for their client to resume them (after a restart or a broken connection).",
               [("", Double(sessions?["waiting"]?.intValue ?? 0))])
        metric("sessions_expired_total", "counter", "Sessions nobody resumed within --orphan-grace (their runs ended FAILED).", [("", Double(sessions?["expired"]?.intValue ?? 0))])
        metric("active_runs", "gauge", "Runs not yet ended.", [("", Double(s["active_runs"]?.arrayValue?.count ?? 0))])
        metric("pending_records", "gauge", "Records accepted and not yet uploaded.", [("", number("pending_records"))])
        metric("applied_records_total", "counter", "Records the destinations applied.", [("", number("applied_records"))])
        metric("rejected_records_total", "counter", "Records the destinations refused.", [("", number("rejected_records"))])
        metric("metrics_accepted_total", "counter", "Metrics accepted from clients.", [("", number("metrics_accepted"))])
        metric("metrics_written_total", "counter", "Metrics written to the destinations.", [("", number("metrics_written"))])
        metric("write_rate_metrics_per_second", "gauge", "Metrics written per second over the last ten seconds.", [("", number("write_rate_metrics_per_s"))])
        metric("frames_received_total", "counter", "Frames received from clients.", [("", number("frames_received"))])
        metric("errors_sent_total", "counter", "Errors reported to clients.", [("", number("errors_sent"))])
        let journal = s["journal"]?.objectValue ?? [:]
        metric("journal_bytes", "gauge", "Bytes of journal segments on disk.", [("", Double(journal["bytes"]?.intValue ?? 0))])
        metric("journal_corrupt_records_total", "counter", "Corrupt journal records skipped at the last start.", [("", Double(journal["corrupt_records"]?.intValue ?? 0))])
        let destinations = s["destinations"]?.arrayValue ?? []
        let label = { (d: JSONValue) in "{destination=\"\(escape(d["destination"]?.stringValue ?? ""))\"}" }
        metric("destination_pending_records", "gauge", "Records pending per destination.", destinations.map { (label($0), Double($0["pending_records"]?.intValue ?? 0)) })
        metric("destination_retries_total", "counter", "Retried sink calls per destination.", destinations.map { (label($0), Double($0["retries"]?.intValue ?? 0)) })
        metric("destination_healthy", "gauge", "1 when the destination's last call succeeded.", destinations.map { (label($0), $0["state"]?.stringValue == "running" ? 1 : 0) })
        if let last = s["last_success_ms"]?.intValue {
            metric("last_success_timestamp_seconds", "gauge", "When a destination last applied a call.", [("", Double(last) / 1000)])
        }
        return out
    }

    static func format(_ v: Double) -> String { v == v.rounded() && abs(v) < 1e15 ? String(Int64(v)) : String(v) }

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"").replacingOccurrences(of: "\n", with: "\\n")
    }
}
