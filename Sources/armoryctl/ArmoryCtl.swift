import ArgumentParser
import ArmoryProtocol
import ArmoryTrack
import Foundation

/// `armoryctl`: the admin tool for a running armoryd.
@main
struct ArmoryCtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "armoryctl",
        abstract: "Inspect and control a running armoryd.",
        version: ArmoryTrackVersion.current,
        subcommands: [Status.self, Runs.self, Flush.self, Sync.self, Metrics.self, MLflowServer.self],
        defaultSubcommand: Status.self)
}

/// Options every subcommand shares.
struct ConnectionOptions: ParsableArguments {
    @Option(help: "The daemon's socket (default: $ARMORY_SOCKET, else the per-user socket, else /run/armory/armoryd.sock).")
    var socket: String?

    @Flag(help: "Print JSON instead of text.")
    var json = false

    /// Connects, or exits 3 with the reason when no daemon answers. An admin command fails fast
    /// when the daemon goes away: it does not resume its session.
    func connect(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> Connection {
        do {
            return try Connection(socketPath: socket, client: "armoryctl", environment: environment, resumesSession: false)
        } catch {
            FileHandle.standardError.write(Data("armoryctl: \(error)\n".utf8))
            throw ExitCode(3)
        }
    }

    /// The daemon's status reply, or exit 3 when no daemon answers.
    func status(_ connection: Connection) throws -> JSONObject {
        do { return try connection.status() } catch {
            FileHandle.standardError.write(Data("armoryctl: \(error)\n".utf8))
            throw ExitCode(3)
        }
    }

    func printJSON(_ value: JSONValue) {
        print(String(decoding: value.serialized, as: UTF8.self))
    }
}

extension ArmoryCtl {
    /// `armoryctl status`: what the daemon is doing. Exit 0 running, 1 degraded, 3 not running.
    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show the daemon's state, clients, active runs and pending work.",
            discussion: "Exit status: 0 running, 1 degraded (records are being refused or the store fails), 3 not running.")

        @OptionGroup var options: ConnectionOptions

        func run() throws {
            let status = try options.status(options.connect())
            if options.json {
                options.printJSON(.object(status))
            } else {
                print(StatusText.render(status))
            }
            if status["state"]?.stringValue != "running" { throw ExitCode(1) }
        }
    }
}

/// The human form of a status reply, laid out like `systemctl status`.
enum StatusText {
    static func render(_ s: JSONObject) -> String {
        let state = s["state"]?.stringValue ?? "unknown"
        var lines = ["\(state == "running" ? "●" : "×") armoryd \(s["version"]?.stringValue ?? "?") — \(state)"]
        func row(_ label: String, _ value: String) { lines.append(label.leftPadded(to: 14) + ": " + value) }
        row("PID", "\(s["pid"]?.intValue ?? 0)")
        row("Uptime", duration(s["uptime_s"]?.doubleValue ?? 0))
        row("Socket", s["socket"]?.stringValue ?? "?")
        let destinations = s["destinations"]?.arrayValue ?? []
        row("Destinations", "\(destinations.count)")
        for d in destinations {  // credentials are never in the status: URIs without user info
            let error = d["last_error"]?.stringValue.map { "  last error: \($0.prefix(100))" } ?? ""
            lines.append(String(repeating: " ", count: 16) + "\(d["destination"]?.stringValue ?? "?")  \(d["state"]?.stringValue ?? "?"), \(d["pending_records"]?.intValue ?? 0) pending\(error)")
        }
        let clients = s["clients"]?.arrayValue ?? []
        row("Clients", "\(clients.count) connected")
        for c in clients {
            lines.append(String(repeating: " ", count: 16) + "pid \(c["pid"]?.intValue ?? 0) uid \(c["uid"]?.intValue ?? 0)  \(c["client"]?.stringValue ?? "")  \(c["program"]?.stringValue ?? "")")
        }
        if let waiting = s["sessions"]?["waiting"]?.intValue, waiting > 0 {
            row("Sessions", "\(waiting) waiting for their clients to resume (after a restart or a broken connection)")
        }
        let runs = s["active_runs"]?.arrayValue ?? []
        row("Active runs", "\(runs.count)")
        for r in runs {
            let connected = r["connected"]?.boolValue == true ? "" : "  (client gone)"
            lines.append(String(repeating: " ", count: 16) + "\(r["run_id"]?.stringValue ?? "?")  \(r["experiment"]?.stringValue ?? "")/\(r["name"]?.stringValue ?? "")  pid \(r["client_pid"]?.intValue ?? 0)\(connected)")
        }
        let journalBytes = s["journal"]?["bytes"]?.intValue ?? 0
        row("Backlog", "\(s["pending_records"]?.intValue ?? 0) records, journal \(ByteText.render(journalBytes))")
        row("Upload rate", "\(s["write_rate_metrics_per_s"]?.doubleValue ?? 0) metrics/s (last 10 s)")
        if let host = s["host"]?.objectValue, !host.isEmpty {
            func figure(_ key: String) -> String { host[key]?.doubleValue.map { String(format: "%.1f", $0) } ?? "?" }
            var text = "CPU \(figure("cpu_utilization_percentage"))%, memory \(figure("system_memory_usage_megabytes")) MB (\(figure("system_memory_usage_percentage"))%), "
                + "disk \(figure("disk_usage_percentage"))% (\(figure("disk_available_megabytes")) MB free)"
            let gpus = host.keys.filter { $0.hasSuffix("_utilization_percentage") && $0.hasPrefix("gpu_") }.sorted()
            for gpu in gpus { text += ", \(gpu.dropLast("_utilization_percentage".count)) \(figure(gpu))%" }
            row("Host", text)
        }
        row("Written", "\(s["applied_records"]?.intValue ?? 0) records, \(s["metrics_written"]?.intValue ?? 0) metrics")
        row("Rejected", "\(s["rejected_records"]?.intValue ?? 0) records")
        if let last = s["last_success_ms"]?.intValue {
            let ago = Date().timeIntervalSince1970 - Double(last) / 1000
            row("Last write", duration(max(0, ago)) + " ago")
        } else {
            row("Last write", "never")
        }
        row("Last error", s["last_error"]?.stringValue ?? "none")
        for job in s["syncs"]?.arrayValue ?? [] where !["complete", "failed"].contains(job["state"]?.stringValue ?? "") {
            row("Sync", ArmoryCtl.Sync.describe(job))
        }
        return lines.joined(separator: "\n")
    }

    static func duration(_ seconds: Double) -> String {
        let total = Int(seconds)
        if total < 60 { return String(format: "%.1fs", seconds) }
        let (h, m, sec) = (total / 3600, (total % 3600) / 60, total % 60)
        return h > 0 ? "\(h)h \(m)m \(sec)s" : "\(m)m \(sec)s"
    }
}

extension String {
    func leftPadded(to width: Int) -> String { String(repeating: " ", count: max(0, width - count)) + self }
}
