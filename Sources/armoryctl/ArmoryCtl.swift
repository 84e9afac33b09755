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
        discussion: "Global options (--socket PATH, --json) go before or after the command, as with git -C or systemctl --user. Exit status: 0 success, 1 degraded or not done, 3 no daemon, 4 not permitted, 64 usage.",
        version: ArmoryTrackVersion.current,
        subcommands: [Status.self, Runs.self, Flush.self, Errors.self, Sync.self, Metrics.self, MLflowServer.self, Stop.self],
        defaultSubcommand: Status.self)

    /// Parses the command line the way people type it: global options may come before the command.
    static func main() {
        let commands = configuration.subcommands.map { $0._commandName }
        switch CommandLineOrder.arrange(Array(CommandLine.arguments.dropFirst()), commands: commands) {
        case .arguments(let arguments):
            do {
                var command = try parseAsRoot(arguments)
                try command.run()
            } catch let failure as Failure {
                if arguments.contains("--json") { printJSONError(failure.description) }
                FileHandle.standardError.write(Data("armoryctl: \(failure)\n".utf8))
                Glibc.exit(failure.exitCode)
            } catch {
                // `--json` always prints JSON: a parse or usage error's here (a command that exits
                // with its own code printed its JSON already).
                if arguments.contains("--json"), !(error is ExitCode), exitCode(for: error) != .success { printJSONError(message(for: error)) }
                exit(withError: error)
            }
        case .unknownCommand(let word):
            let list = configuration.subcommands.map { "  " + $0._commandName.padding(toLength: 15, withPad: " ", startingAt: 0) + $0.configuration.abstract }
            FileHandle.standardError.write(Data("armoryctl: unknown command '\(word)'.\n\nCommands:\n\(list.joined(separator: "\n"))\n\nSee 'armoryctl <command> --help'.\n".utf8))
            Glibc.exit(ExitCode.validationFailure.rawValue)
        }
    }
}

/// A command's failure as the JSON `--json` promises: `{"error": …}` on stdout.
private func printJSONError(_ message: String) {
    print(String(decoding: JSONValue.object(["error": .string(message)]).serialized, as: UTF8.self))
}

/// Moves the global options typed before the command to after it, where the parser reads them.
enum CommandLineOrder {
    enum Result: Equatable {
        case arguments([String])
        case unknownCommand(String)
    }

    /// `armoryctl --socket S --json status -x` → `status --socket S --json -x`. A first word that
    /// is no command (nor `help`) is an unknown command; options alone run the default command.
    static func arrange(_ arguments: [String], commands: [String]) -> Result {
        var globals: [String] = []
        var index = 0
        while index < arguments.count {
            let argument = arguments[index]
            if argument == "--json" || argument.hasPrefix("--socket=") {
                globals.append(argument)
                index += 1
            } else if argument == "--socket", index + 1 < arguments.count {
                globals += arguments[index...(index + 1)]
                index += 2
            } else {
                break
            }
        }
        guard index < arguments.count else { return .arguments(arguments) }
        let word = arguments[index]
        if word.hasPrefix("-") { return .arguments(arguments) }  // --help, --version, a command's own option
        guard commands.contains(word) || word == "help" else { return .unknownCommand(word) }
        return .arguments([word] + globals + arguments[(index + 1)...])
    }
}

/// Options every subcommand shares.
struct ConnectionOptions: ParsableArguments {
    @Option(help: "The daemon's socket (default: $ARMORY_SOCKET, else the per-user socket, else /run/armory/armoryd.sock).")
    var socket: String?

    @Flag(help: "Print JSON instead of text (also when no daemon answers: {\"state\": \"not running\", …}).")
    var json = false

    /// Connects, or exits 3 with the reason when no daemon answers. An admin command fails fast
    /// when the daemon goes away: it does not resume a session, and it is not listed as a client.
    func connect(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> Connection {
        do {
            return try Connection(socketPath: socket, client: "armoryctl", environment: environment, admin: true)
        } catch {
            throw notRunning(error)
        }
    }

    /// The daemon's status reply, or exit 3 when no daemon answers.
    func status(_ connection: Connection) throws -> StatusReply {
        let reply: JSONObject
        do { reply = try connection.status() } catch {
            throw notRunning(error)
        }
        guard let status = StatusReply(json: reply) else {
            FileHandle.standardError.write(Data("armoryctl: the daemon's status reply is not one this armoryctl reads (is the daemon another version?)\n".utf8))
            throw ExitCode(1)
        }
        return status
    }

    /// A request's reply; a refusal is printed and exits 1.
    func request(_ op: ClientOp, connection: Connection) throws -> JSONObject {
        do { return try connection.request(op) } catch {
            FileHandle.standardError.write(Data("armoryctl: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }

    /// Says that no daemon answers, or that this user may not connect (as JSON with `--json`);
    /// exit status 3, or 4 when not permitted.
    private func notRunning(_ error: ArmoryError) -> ExitCode {
        let denied: Bool
        if case .permissionDenied = error { denied = true } else { denied = false }
        if json {
            printJSON(.object(["state": .string(denied ? "not permitted" : "not running"), "socket": socket.map { .string($0) } ?? .null, "error": .string("\(error)")]))
        }
        FileHandle.standardError.write(Data("armoryctl: \(error)\n".utf8))
        return ExitCode(denied ? 4 : 3)
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
                options.printJSON(.object(status.json))
            } else {
                print(StatusText.render(status))
            }
            if status.state != "running" { throw ExitCode(1) }
        }
    }
}

/// The human form of a status reply, laid out like `systemctl status`.
enum StatusText {
    static func render(_ s: StatusReply) -> String {
        var lines = ["\(s.state == "running" ? "●" : "×") armoryd \(s.version) — \(s.state)"]
        func row(_ label: String, _ value: String) { lines.append(label.leftPadded(to: 14) + ": " + value) }
        row("PID", "\(s.pid)")
        row("Uptime", duration(s.uptimeSeconds))
        row("Socket", s.socket)
        row("Destinations", "\(s.destinations.count)")
        for d in s.destinations {  // credentials are never in the status: URIs without user info
            let error = d.lastError.map { "  last error: \($0.prefix(100))" } ?? ""
            lines.append(String(repeating: " ", count: 16) + "\(d.destination)  \(d.state), \(d.pendingRecords) pending\(error)")
        }
        row("Clients", "\(s.clients.count) connected")
        for c in s.clients {
            lines.append(String(repeating: " ", count: 16) + "pid \(c.pid) uid \(c.uid)  \(c.client)  \(c.program)")
        }
        if s.sessions.waiting > 0 {
            row("Sessions", "\(s.sessions.waiting) waiting for their clients to resume (after a restart or a broken connection)")
        }
        row("Active runs", "\(s.activeRuns.count)")
        for r in s.activeRuns {
            let connected = r.connected ? "" : "  (client gone)"
            lines.append(String(repeating: " ", count: 16) + "\(r.runID ?? "?")  \(r.experiment)/\(r.name)  pid \(r.clientPID)\(connected)")
        }
        if let others = s.otherUsers {
            row("Other users", "\(others.activeRuns) active runs, \(others.clients) clients, \(others.destinations) destinations (only admins see them)")
        }
        row("Backlog", "\(s.pendingRecords) records, journal \(ByteText.render(s.journal.bytes))")
        let byUser = s.backlogByUID.sorted { $0.key < $1.key }.map { "uid \($0.key) \(ByteText.render($0.value))" }
        if byUser.count > 1 { lines.append(String(repeating: " ", count: 16) + byUser.joined(separator: ", ")) }
        row("Upload rate", "\(s.writeRateMetricsPerSecond) metrics/s (last 10 s)")
        if !s.host.isEmpty {
            let host = s.host
            func figure(_ key: String) -> String { host[key].map { String(format: "%.1f", $0) } ?? "?" }
            var text =
                "CPU \(figure("cpu_utilization_percentage"))%, memory \(figure("system_memory_usage_megabytes")) MB (\(figure("system_memory_usage_percentage"))%), "
                + "disk \(figure("disk_usage_percentage"))% (\(figure("disk_available_megabytes")) MB free)"
            let gpus = host.keys.filter { $0.hasSuffix("_utilization_percentage") && $0.hasPrefix("gpu_") }.sorted()
            for gpu in gpus { text += ", \(gpu.dropLast("_utilization_percentage".count)) \(figure(gpu))%" }
            row("Host", text)
        }
        row("Written", "\(s.appliedRecords) records, \(s.metricsWritten) metrics (\(s.metricsWritten - s.metricsWrittenSystem) from clients, \(s.metricsWrittenSystem) system/… host metrics)")
        row("Rejected", "\(s.rejectedRecords) records refused by the destinations, \(s.deadLetters) dead letters kept since the start (armoryctl errors)")
        row("Refused", "\(s.errorsSent) client operations (errors sent back to clients)")
        let nowMs = Date().timeIntervalSince1970 * 1000
        func ago(_ ms: Int64) -> String { duration(max(0, (nowMs - Double(ms)) / 1000)) + " ago" }
        row("Last write", s.lastSuccessMs.map(ago) ?? "never")
        row("Last error", lastError(s, ago: ago))
        for job in s.syncs where !job.isFinished {
            row("Sync", ArmoryCtl.Sync.describe(job))
        }
        return lines.joined(separator: "\n")
    }

    /// The latest of the destinations' last error and the last error sent to a client.
    static func lastError(_ s: StatusReply, ago: (Int64) -> String) -> String {
        let store = s.lastError.map { (ms: s.lastErrorMs ?? 0, text: "destination: \($0.prefix(200))") }
        let refusal = s.lastRefusal.map { r in
            let ms = r["time_ms"]?.intValue ?? 0
            let op = r["op"]?.stringValue.map { " in '\($0)'" } ?? ""
            return (ms: ms, text: "\(r["code"]?.stringValue ?? "?")\(op) to pid \(r["pid"]?.intValue ?? 0) (uid \(r["uid"]?.intValue ?? 0)): \(r["message"]?.stringValue?.prefix(200) ?? "")")
        }
        guard let latest = [store, refusal].compactMap({ $0 }).max(by: { $0.ms < $1.ms }) else { return "none" }
        return (latest.ms > 0 ? ago(latest.ms) + ", " : "") + latest.text
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
