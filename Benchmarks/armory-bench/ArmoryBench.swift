import ArgumentParser
import ArmoryProtocol
import ArmoryTrack
import Foundation
import MLflow
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// `armory-bench`: figures next to baselines measured in the same run (see Benchmarks/README.md).
@main
struct ArmoryBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "armory-bench", abstract: "Benchmarks armoryd against baselines measured in the same run.")

    @Option(help: "The armoryd binary to start (a release build).")
    var daemon: String?

    @Option(help: "Fire-and-forget calls timed one by one.")
    var calls = 100_000

    @Option(help: "Concurrent clients for the headline ingest figure and the cost of fsync.")
    var clients = 8

    @Option(help: "Metrics each client sends for the headline ingest figure.")
    var metricsPerClient = 250_000

    @Option(help: "Client counts of the ingest matrix (each with single-metric and 100-metric frames), comma-separated.")
    var ingestClients = "1,8,64"

    @Option(help: "Metrics per ingest-matrix scenario, split across its clients.")
    var ingestMetrics = 2_000_000

    @Option(help: "Where the ingest matrix writes: null (journaled, then discarded: the daemon's own cost) or local (the local store).")
    var ingestSink = "null"

    @Option(help: "Sections to run, comma-separated: calls, ingest, matrix, durability, recovery, drain, sampling, scale.")
    var sections = "calls,ingest,matrix,durability,recovery,drain,sampling,scale"

    @Option(help: "Metrics per run of the scale figure, comma-separated (one client, single-metric frames).")
    var scaleRunMetrics = "1000,10000,100000,1000000"

    @Option(help: "Connected clients of the scale figure, comma-separated (idle, then busy).")
    var scaleClients = "1,16,64,256"

    @Option(help: "Metrics the busy phase of each scale-clients row sends, split across its clients.")
    var scaleBusyMetrics = 1_000_000

    @Option(help: "WatchdogSec of the scale-clients daemons (as the system unit sets it; 0: no watchdog), with a notify socket of the bench's.")
    var scaleWatchdogSeconds = 30

    @Option(help: "Seconds over which the scale-clients daemons' idle wake-ups are counted.")
    var scaleIdleSeconds = 30.0

    @Option(help: "Active runs during the system-metrics sampling figure.")
    var samplingRuns = 64

    @Option(help: "Seconds the sampling figure measures the daemon's CPU for.")
    var samplingSeconds = 20.0

    @Option(help: "An MLflow server (http://127.0.0.1:PORT) for the drain figure; skipped when absent.")
    var mlflow: String?

    @Option(help: "Runs (and concurrent uploads) for the drain figure.")
    var drainRuns = 4

    @Option(help: "Metrics per run for the drain figure.")
    var drainMetrics = 100_000

    @Option(help: "Gigabytes of journal backlog whose recovery after kill -9 is timed (0: skip).")
    var recoveryGB = 1.0

    @Option(help: "Where to write the JSON results.")
    var output = "Benchmarks/results/latest.json"

    @Option(help: .hidden) var clientSocket: String?
    @Option(help: .hidden) var clientEvaluation = "bench"
    @Option(help: .hidden) var clientName = "client"
    @Option(help: .hidden) var clientMetrics = 0
    @Option(help: .hidden) var clientPerFrame = 1

    func run() async throws {
        if let clientSocket {
            // Client mode: this process is one of the benchmark's clients (see ClientProcesses).
            try ClientWorkload(socketPath: clientSocket, evaluation: clientEvaluation, metrics: clientMetrics, perFrame: clientPerFrame).runHere(name: clientName)
            return
        }
        guard let daemon else { throw ValidationError("--daemon is required: the armoryd binary to start") }
        let home = "/tmp/armory-bench-" + String(getpid())
        try FileManager.default.createDirectory(atPath: home, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: home) }
        let (process, socketPath) = try Self.startDaemon(daemon, home: home + "/local", environment: [:])
        defer {
            process.terminate()
            process.waitUntilExit()
        }

        var results: [(String, JSONValue)] = []
        var table: [String] = []
        let wanted = Set(sections.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) })
        let sample = Self.sampleFrame(handle: "h0123456789abcdef0123")

        // 1. Client call cost: ArmoryTrack's logMetric vs a raw write() of the same frame bytes.
        if wanted.contains("calls") {
            let tracker = try Tracker(socketPath: socketPath, program: "armory-bench")
            let callEvaluation = tracker.evaluation("bench-call-cost")
            let run = try callEvaluation.start()
            let floor = Self.rawWriteLatencies(frame: sample, count: calls)
            var latencies = [UInt64](repeating: 0, count: calls)
            for i in 0..<1000 { run.logMetric("warmup", Double(i), step: Int64(i)) }
            for i in 0..<calls {
                let start = Self.nanos()
                run.logMetric("loss", Double(i) * 0.001, step: Int64(i))
                latencies[i] = Self.nanos() - start
            }
            try tracker.flush(.uploaded, timeout: 120)
            try callEvaluation.end()
            let call = Percentiles(latencies)
            let raw = Percentiles(floor)
            table.append(String(format: "%-44@ p50 %7.2f µs  p99 %7.2f µs  p99.9 %7.2f µs", "ArmoryTrack logMetric (fire-and-forget)" as NSString, call.p50, call.p99, call.p999))
            table.append(String(format: "%-44@ p50 %7.2f µs  p99 %7.2f µs  p99.9 %7.2f µs", "baseline: raw write() of the same frame" as NSString, raw.p50, raw.p99, raw.p999))
            table.append(String(format: "%-44@ p50 %.2fx  p99 %.2fx of the raw write", "ratio" as NSString, call.p50 / raw.p50, call.p99 / raw.p99))
            results.append(
                (
                    "call_cost",
                    .object([
                        "calls": .int(Int64(calls)), "armorytrack_us": call.json, "raw_write_us": raw.json,
                        "ratio_p50": .double(call.p50 / raw.p50), "ratio_p99": .double(call.p99 / raw.p99),
                    ])
                ))
            tracker.connection.disconnect()
        }

        // 2. Sustained ingest with N concurrent clients into the daemon and its local store,
        //    next to N raw socket writers of the same frames into a reader that discards them.
        let total = Double(clients * metricsPerClient)
        var rate = 0.0
        if wanted.contains("ingest") {
            let ceiling = Self.rawIngest(clients: clients, frame: sample, frames: metricsPerClient)
            let (ingestProcess, ingestSocket) = try Self.startDaemon(daemon, home: home + "/ingest", environment: [:])
            let (elapsed, cpu, peakKB) = try Self.daemonIngest(socketPath: ingestSocket, daemonPID: ingestProcess.processIdentifier, clients: clients, metrics: metricsPerClient)
            ingestProcess.terminate()
            ingestProcess.waitUntilExit()
            rate = total / elapsed
            table.append(
                String(
                    format: "%-44@ %10.0f metrics/s  (%d clients × %d single-metric frames, written to the store; %.2f CPU-s per 1M; peak RSS %d MB)",
                    "armoryd ingest" as NSString, rate, clients, metricsPerClient, cpu / total * 1e6, peakKB / 1024))
            table.append(String(format: "%-44@ %10.0f frames/s", "baseline: raw socket writes, same frames" as NSString, ceiling))
            table.append(String(format: "%-44@ %.2fx of the raw transport", "ratio" as NSString, rate / ceiling))
            results.append(
                (
                    "ingest",
                    .object([
                        "clients": .int(Int64(clients)), "metrics_per_client": .int(Int64(metricsPerClient)),
                        "metrics_per_s": .double(rate.rounded()), "raw_frames_per_s": .double(ceiling.rounded()), "ratio": .double(rate / ceiling),
                        "daemon_cpu_s_per_million": .double(cpu / total * 1e6), "daemon_peak_rss_mb": .int(Int64(peakKB / 1024)),
                    ])
                ))
        }

        // 2b. The ingest matrix: 1, 8 and 64 concurrent clients, single-metric and 100-metric
        //     frames, acked once fsynced and written to the local store.
        if wanted.contains("matrix") {
            var rows: [JSONValue] = []
            for count in ingestClients.split(separator: ",").compactMap({ Int($0.trimmingCharacters(in: .whitespaces)) }) {
                for perFrame in [1, 100] {
                    let perClient = max(perFrame, ingestMetrics / count / perFrame * perFrame)
                    let (matrixProcess, matrixSocket) = try Self.startDaemon(
                        daemon, home: home + "/matrix-\(count)-\(perFrame)", environment: [:],
                        arguments: ingestSink == "null" ? ["--tracking-uri", "null:"] : [])
                    let (elapsed, cpu, peakKB) = try Self.daemonIngest(
                        socketPath: matrixSocket, daemonPID: matrixProcess.processIdentifier,
                        clients: count, metrics: perClient, perFrame: perFrame)
                    matrixProcess.terminate()
                    matrixProcess.waitUntilExit()
                    let metrics = Double(count * perClient)
                    table.append(
                        String(
                            format: "%-44@ %10.0f metrics/s %9.0f frames/s  %.2f CPU-s per 1M  peak RSS %d MB",
                            "ingest (\(ingestSink)) \(count) clients × \(perFrame)-metric frames" as NSString, metrics / elapsed, metrics / Double(perFrame) / elapsed,
                            cpu / metrics * 1e6, peakKB / 1024))
                    rows.append(
                        .object([
                            "clients": .int(Int64(count)), "metrics_per_frame": .int(Int64(perFrame)), "metrics": .int(Int64(metrics)), "sink": .string(ingestSink),
                            "metrics_per_s": .double((metrics / elapsed).rounded()), "frames_per_s": .double((metrics / Double(perFrame) / elapsed).rounded()),
                            "daemon_cpu_s_per_million": .double(cpu / metrics * 1e6), "daemon_peak_rss_mb": .int(Int64(peakKB / 1024)),
                        ]))
                }
            }
            results.append(("ingest_matrix", .array(rows)))
        }

        // 3. The cost of durability: the same ingest into a daemon whose journal does not fsync.
        if wanted.contains("durability") && wanted.contains("ingest") {
            let (unsyncedProcess, unsyncedSocket) = try Self.startDaemon(daemon, home: home + "/nofsync", environment: [:], arguments: ["--journal-fsync", "off"])
            let (unsyncedElapsed, _, _) = try Self.daemonIngest(socketPath: unsyncedSocket, daemonPID: unsyncedProcess.processIdentifier, clients: clients, metrics: metricsPerClient)
            unsyncedProcess.terminate()
            unsyncedProcess.waitUntilExit()
            let unsyncedRate = total / unsyncedElapsed
            table.append(String(format: "%-44@ %10.0f metrics/s  (same ingest, --journal-fsync off)", "baseline: journal without fsync" as NSString, unsyncedRate))
            table.append(String(format: "%-44@ %.2fx of the unsynced journal", "ratio (cost of fsync)" as NSString, rate / unsyncedRate))
            results.append(
                (
                    "durability",
                    .object([
                        "fsync_metrics_per_s": .double(rate.rounded()), "no_fsync_metrics_per_s": .double(unsyncedRate.rounded()), "ratio": .double(rate / unsyncedRate),
                    ])
                ))
        }

        // 4. Recovery: a daemon whose server is unreachable builds a backlog of `recoveryGB` in
        //    its journal, is killed with SIGKILL, and is started again; timed until it answers.
        if recoveryGB > 0 && wanted.contains("recovery") {
            let figure = try Self.recovery(daemon, home: home + "/recovery", bytes: Int(recoveryGB * Double(1 << 30)))
            table.append(
                String(
                    format: "%-44@ %10.2f s  (%.2f GB, %d segments; RSS after replay %d MB; the first start of an empty journal took %.2f s)",
                    "recovery after kill -9" as NSString, figure.seconds, Double(figure.bytes) / Double(1 << 30), figure.segments, figure.rssKB / 1024, figure.emptySeconds))
            table.append(
                String(
                    format: "%-44@ %@", "daemon RSS while the backlog grew" as NSString,
                    figure.rssByBacklog.map { "\($0.bytes >> 20) MB backlog: \($0.rssKB / 1024) MB" }.joined(separator: ", ") as NSString))
            results.append(
                (
                    "recovery",
                    .object([
                        "journal_bytes": .int(Int64(figure.bytes)), "seconds": .double(figure.seconds), "empty_start_seconds": .double(figure.emptySeconds),
                        "rss_mb_after_replay": .int(Int64(figure.rssKB / 1024)), "replayed_records": .int(Int64(figure.records)),
                        "rss_mb_by_backlog_mb": .array(figure.rssByBacklog.map { .object(["backlog_mb": .int(Int64($0.bytes >> 20)), "rss_mb": .int(Int64($0.rssKB / 1024))]) }),
                    ])
                ))
        }

        // 5. Drain into a real MLflow server: armoryd end to end next to raw log-batch calls with
        //    prebuilt 1000-metric bodies at the same concurrency, against the same server.
        if let mlflow, wanted.contains("drain") {
            // The server slows as its tables grow: measure the ceiling before and after, use the mean.
            let rawBefore = try await Self.rawLogBatch(server: mlflow, runs: drainRuns, metrics: drainMetrics)
            let (drainProcess, drainSocket) = try Self.startDaemon(daemon, home: home + "/drain", environment: ["MLFLOW_TRACKING_URI": mlflow])
            let drained = try Self.armorydDrain(socketPath: drainSocket, runs: drainRuns, metrics: drainMetrics)
            drainProcess.terminate()
            drainProcess.waitUntilExit()
            let rawAfter = try await Self.rawLogBatch(server: mlflow, runs: drainRuns, metrics: drainMetrics)
            let raw = (rawBefore + rawAfter) / 2
            table.append(String(format: "%-44@ %10.0f metrics/s  (%d runs × %d metrics, 100-metric frames, until confirmed by the server)", "armoryd drain into mlflow server" as NSString, drained, drainRuns, drainMetrics))
            table.append(String(format: "%-44@ %10.0f metrics/s  (%d concurrent, prebuilt 1000-metric bodies; %.0f before, %.0f after)", "baseline: raw log-batch" as NSString, raw, drainRuns, rawBefore, rawAfter))
            table.append(String(format: "%-44@ %.2fx of raw log-batch", "ratio" as NSString, drained / raw))
            results.append(
                (
                    "drain",
                    .object([
                        "runs": .int(Int64(drainRuns)), "metrics_per_run": .int(Int64(drainMetrics)),
                        "armoryd_metrics_per_s": .double(drained.rounded()), "raw_log_batch_metrics_per_s": .double(raw.rounded()),
                        "raw_before": .double(rawBefore.rounded()), "raw_after": .double(rawAfter.rounded()), "ratio": .double(drained / raw),
                    ])
                ))
        }

        // 6. The daemon's CPU cost of system-metrics sampling with many active runs: the same
        //    daemon and runs with sampling every second and with sampling off.
        if wanted.contains("sampling") {
            var cost: [String: Double] = [:]
            for (label, interval) in [("on", "1"), ("off", "0")] {
                let (sampler, samplerSocket) = try Self.startDaemon(
                    daemon, home: home + "/sampling-" + label, environment: [:],
                    arguments: ["--system-metrics-interval", interval])
                let tracker = try Tracker(socketPath: samplerSocket, program: "armory-bench")
                let evaluation = tracker.evaluation("bench-sampling")
                for i in 0..<max(0, samplingRuns - 1) { _ = try evaluation.addChain("run-\(i)").start() }
                try tracker.flush(.uploaded, timeout: 60)
                let before = Self.cpuSeconds(pid: sampler.processIdentifier)
                try await Task.sleep(for: .seconds(samplingSeconds))
                cost[label] = (Self.cpuSeconds(pid: sampler.processIdentifier) - before) / samplingSeconds
                try evaluation.end()
                tracker.connection.disconnect()
                sampler.terminate()
                sampler.waitUntilExit()
            }
            let perSecond = max(0, cost["on"]! - cost["off"]!) * 100
            table.append(
                String(
                    format: "%-44@ %6.2f %% of a core at a 1 s interval (%.2f %% at the default 10 s); daemon %.2f %% with, %.2f %% without",
                    "system-metrics sampling, \(samplingRuns) runs" as NSString, perSecond, perSecond / 10, cost["on"]! * 100, cost["off"]! * 100))
            results.append(
                (
                    "sampling",
                    .object([
                        "runs": .int(Int64(samplingRuns)), "core_percent_at_1s": .double(perSecond), "core_percent_at_10s": .double(perSecond / 10),
                        "daemon_core_percent_sampling": .double(cost["on"]! * 100), "daemon_core_percent_not_sampling": .double(cost["off"]! * 100),
                    ])
                ))
        }

        // 7. Scale: time and memory for one run of 1k to 1M metrics, and for 1 to 256 connected
        //    clients, idle (RSS, wake-ups per second) and then busy (rate, peak RSS).
        if wanted.contains("scale") {
            var runRows: [JSONValue] = []
            for metrics in scaleRunMetrics.split(separator: ",").compactMap({ Int($0.trimmingCharacters(in: .whitespaces)) }) {
                let (scaleProcess, scaleSocket) = try Self.startDaemon(daemon, home: home + "/scale-run-\(metrics)", environment: [:])
                let (elapsed, _, peakKB) = try Self.daemonIngest(socketPath: scaleSocket, daemonPID: scaleProcess.processIdentifier, clients: 1, metrics: metrics)
                scaleProcess.terminate()
                scaleProcess.waitUntilExit()
                table.append(
                    String(
                        format: "%-44@ %8.3f s  %6.2f µs per metric  peak RSS %d MB", "scale: one run of \(metrics) metrics" as NSString,
                        elapsed, elapsed / Double(metrics) * 1e6, peakKB / 1024))
                runRows.append(
                    .object([
                        "metrics": .int(Int64(metrics)), "seconds": .double(elapsed), "us_per_metric": .double(elapsed / Double(metrics) * 1e6),
                        "daemon_peak_rss_mb": .int(Int64(peakKB / 1024)),
                    ]))
            }
            var clientRows: [JSONValue] = []
            for count in scaleClients.split(separator: ",").compactMap({ Int($0.trimmingCharacters(in: .whitespaces)) }) {
                // Sampling off: its cost with many runs is the sampling figure's. The watchdog on,
                // as under the system unit: its health checks are part of the idle figure.
                let scaleHome = home + "/scale-clients-\(count)"
                var watchdog: [String: String] = [:]
                if scaleWatchdogSeconds > 0 {
                    try FileManager.default.createDirectory(atPath: scaleHome, withIntermediateDirectories: true)
                    watchdog = ["NOTIFY_SOCKET": try NotifySocket.bound(at: scaleHome + "/notify.sock"), "WATCHDOG_USEC": String(scaleWatchdogSeconds * 1_000_000)]
                }
                let (scaleProcess, scaleSocket) = try Self.startDaemon(
                    daemon, home: scaleHome, environment: watchdog, arguments: ["--system-metrics-interval", "0"])
                let pid = scaleProcess.processIdentifier
                let perClient = max(1, scaleBusyMetrics / count)
                let processes = try ClientProcesses(count, ClientWorkload(socketPath: scaleSocket, evaluation: "bench-scale", metrics: perClient, perFrame: 1))
                try await Task.sleep(for: .seconds(2))
                let wakeups = Self.wakeups(pid: pid, over: scaleIdleSeconds)
                let idleKB = Self.procStatusKB(pid: pid, "VmRSS")
                let cpuBefore = Self.cpuSeconds(pid: pid)
                let elapsed = try processes.go()
                let cpu = Self.cpuSeconds(pid: pid) - cpuBefore
                let peakKB = Self.procStatusKB(pid: pid, "VmHWM")
                scaleProcess.terminate()
                scaleProcess.waitUntilExit()
                let metrics = Double(perClient * count)
                table.append(
                    String(
                        format: "%-44@ idle: RSS %d MB, %.2f wake-ups/s; busy: %.0f metrics/s, %.2f CPU-s per 1M, peak RSS %d MB",
                        "scale: \(count) connected clients" as NSString, idleKB / 1024, wakeups, metrics / elapsed, cpu / metrics * 1e6, peakKB / 1024))
                clientRows.append(
                    .object([
                        "clients": .int(Int64(count)), "idle_rss_mb": .int(Int64(idleKB / 1024)), "idle_wakeups_per_s": .double(wakeups),
                        "busy_metrics_per_s": .double((metrics / elapsed).rounded()), "busy_cpu_s_per_million": .double(cpu / metrics * 1e6),
                        "busy_peak_rss_mb": .int(Int64(peakKB / 1024)),
                    ]))
            }
            results.append(("scale", .object(["run_metrics": .array(runRows), "clients": .array(clientRows)])))
        }

        print(table.joined(separator: "\n"))
        var doc = JSONObject()
        doc["machine"] = .object(["cores": .int(Int64(ProcessInfo.processInfo.activeProcessorCount)), "date": .string(ISO8601DateFormatter().string(from: Date()))])
        for (k, v) in results { doc[k] = v }
        try FileManager.default.createDirectory(atPath: (output as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try Data(JSONValue.object(doc).serialized).write(to: URL(fileURLWithPath: output))
        print("results: \(output)")
    }

    /// Starts an armoryd on a private socket and home; waits until it listens.
    static func startDaemon(_ binary: String, home: String, environment: [String: String], arguments: [String] = []) throws -> (Process, String) {
        try FileManager.default.createDirectory(atPath: home, withIntermediateDirectories: true)
        let socketPath = home + "/d.sock"
        unlink(socketPath)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["--socket", socketPath, "--home", home, "--log-level", "warning"] + arguments
        var env = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("MLFLOW_TRACKING") }
        for (k, v) in environment { env[k] = v }
        process.environment = env
        try process.run()
        for _ in 0..<250 where !FileManager.default.fileExists(atPath: socketPath) { usleep(20_000) }
        return (process, socketPath)
    }

    /// `runs` client processes, one run each, `metrics` in 100-metric frames; timed until the
    /// server confirmed every metric.
    static func armorydDrain(socketPath: String, runs: Int, metrics: Int) throws -> Double {
        let clients = try ClientProcesses(runs, ClientWorkload(socketPath: socketPath, evaluation: "bench-drain", metrics: metrics, perFrame: 100))
        return Double(runs * metrics) / (try clients.go())
    }

    /// The ceiling: `runs` concurrent loops posting prebuilt 1000-metric `log-batch` bodies.
    static func rawLogBatch(server: String, runs: Int, metrics: Int) async throws -> Double {
        let client = try MLflowRESTClient(destination: MLflowDestination(trackingURI: server))
        let experiment = try await client.experimentID(getOrCreate: "bench-raw")
        var bodies: [[[UInt8]]] = []
        let time = Int64(Date().timeIntervalSince1970 * 1000)
        for r in 0..<runs {
            let run = try await client.createRun(experimentID: experiment, runName: "raw-\(r)", startTime: time, userID: "bench", tags: [:])
            // The shape armoryd's drain sends: 100 keys per step, 10 steps per body.
            bodies.append(
                (0..<(metrics / 1000)).map { b in
                    var points: [MetricPoint] = []
                    for step in (b * 10)..<(b * 10 + 10) {
                        for key in 0..<100 { points.append(MetricPoint(key: "m\(key)", value: Double(key), step: Int64(step), timestamp: time + Int64(step))) }
                    }
                    return MLflowRESTClient.logBatchBody(runID: run.runID, LogBatch(metrics: points))
                })
        }
        let start = nanos()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for runBodies in bodies {
                group.addTask {
                    for body in runBodies { try await client.postLogBatch(body) }
                }
            }
            try await group.waitForAll()
        }
        let rate = Double(runs * metrics) / (Double(nanos() - start) / 1e9)
        await client.shutdown()
        return rate
    }

    static func nanos() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// A one-metric log frame as ArmoryTrack writes it.
    static func sampleFrame(handle: String) -> [UInt8] {
        let frame = ClientFrame(seq: 123_456, op: .log(run: handle, batch: LogBatch(metrics: [MetricPoint(key: "loss", value: 0.123, step: 4567, timestamp: 1_795_400_000_000)])))
        return frame.encoded
    }

    /// The floor: one write() per frame on a Unix socket whose other end a thread drains.
    static func rawWriteLatencies(frame: [UInt8], count: Int) -> [UInt64] {
        var fds: [Int32] = [0, 0]
        socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds)
        let reader = fds[1]
        let drain = Thread {
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            while buffer.withUnsafeMutableBytes({ read(reader, $0.baseAddress!, $0.count) }) > 0 {}
        }
        drain.start()
        var out = [UInt64](repeating: 0, count: count)
        for i in 0..<count {
            let start = nanos()
            _ = frame.withUnsafeBytes { write(fds[0], $0.baseAddress!, $0.count) }
            out[i] = nanos() - start
        }
        close(fds[0])
        usleep(50_000)
        close(reader)
        return out
    }

    /// N writers pushing the same frames through N socket pairs into readers that discard them.
    static func rawIngest(clients: Int, frame: [UInt8], frames: Int) -> Double {
        let batch = Array((0..<64).flatMap { _ in frame })
        let start = nanos()
        let group = DispatchGroup()
        for _ in 0..<clients {
            var fds: [Int32] = [0, 0]
            socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds)
            let (writer, reader) = (fds[0], fds[1])
            group.enter()
            Thread {
                var buffer = [UInt8](repeating: 0, count: 1 << 16)
                while buffer.withUnsafeMutableBytes({ read(reader, $0.baseAddress!, $0.count) }) > 0 {}
                close(reader)
                group.leave()
            }.start()
            Thread {
                var sent = 0
                while sent < frames {
                    _ = batch.withUnsafeBytes { write(writer, $0.baseAddress!, $0.count) }
                    sent += 64
                }
                close(writer)
            }.start()
        }
        group.wait()
        return Double(clients * frames) / (Double(nanos() - start) / 1e9)
    }

    /// N client processes, each its own connection and run, logging `metrics` in frames of
    /// `perFrame`; timed until every metric is confirmed written by the store (flush wait=uploaded).
    /// Returns the seconds, the daemon's CPU seconds and its peak RSS in KB.
    static func daemonIngest(socketPath: String, daemonPID: Int32, clients: Int, metrics: Int, perFrame: Int = 1) throws -> (Double, Double, Int) {
        let processes = try ClientProcesses(clients, ClientWorkload(socketPath: socketPath, evaluation: "bench-ingest", metrics: metrics, perFrame: perFrame))
        let cpuBefore = cpuSeconds(pid: daemonPID)
        let elapsed = try processes.go()
        return (elapsed, cpuSeconds(pid: daemonPID) - cpuBefore, procStatusKB(pid: daemonPID, "VmHWM"))
    }

    /// A `kB` figure of `/proc/<pid>/status` (VmRSS, VmHWM).
    static func procStatusKB(pid: Int32, _ field: String) -> Int {
        let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        return status.split(separator: "\n").first { $0.hasPrefix(field + ":") }.flatMap { Int($0.split(separator: " ").dropFirst().first ?? "") } ?? 0
    }

    /// Wake-ups per second of every thread of `pid` over `seconds`: context switches (voluntary
    /// and not), polled every 100 ms so that threads which exit meanwhile still count.
    static func wakeups(pid: Int32, over seconds: Double) -> Double {
        func switches() -> [String: Int] {
            let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
            return Dictionary(
                uniqueKeysWithValues: tasks.map { task in
                    let status = (try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/status", encoding: .utf8)) ?? ""
                    return (
                        task,
                        status.split(separator: "\n").filter { $0.hasPrefix("voluntary_ctxt_switches:") || $0.hasPrefix("nonvoluntary_ctxt_switches:") }
                            .compactMap { Int($0.split(separator: "\t").last ?? "") }.reduce(0, +)
                    )
                })
        }
        let first = switches()
        var last = first
        let end = nanos() + UInt64(seconds * 1e9)
        while nanos() < end {
            usleep(100_000)
            last.merge(switches()) { max($0, $1) }
        }
        return Double(last.reduce(0) { $0 + $1.value - (first[$1.key] ?? 0) }) / seconds
    }

    /// What the recovery figure measured.
    struct RecoveryFigure {
        var bytes: Int, segments: Int, records: Int, seconds: Double, emptySeconds: Double, rssKB: Int
        /// The daemon's RSS (KB) as its backlog passed 1/8, 1/4, 1/2 and all of `bytes`.
        var rssByBacklog: [(bytes: Int, rssKB: Int)]
    }

    /// Fills a journal with `bytes` of backlog (1000-metric frames to a server that refuses
    /// connections), kills the daemon with SIGKILL, and times its next start until it answers.
    static func recovery(_ binary: String, home: String, bytes: Int) throws -> RecoveryFigure {
        let unreachable = ["MLFLOW_TRACKING_URI": "http://127.0.0.1:9"]
        let arguments = ["--max-backlog-bytes", String(bytes * 2)]
        var started = nanos()
        let (process, socketPath) = try startDaemon(binary, home: home, environment: unreachable, arguments: arguments)
        let emptySeconds = Double(nanos() - started) / 1e9
        let tracker = try Tracker(socketPath: socketPath, program: "armory-bench")
        let connection = tracker.connection
        let run = try tracker.evaluation("bench-recovery").start()
        let time = Int64(Date().timeIntervalSince1970 * 1000)
        var frame = 0
        func journalBytes() -> Int {
            guard case .array(let all)? = (try? connection.status())?["destinations"], case .object(let first)? = all.first,
                let n = first["journal_bytes"]?.intValue
            else { return 0 }
            return Int(n)
        }
        var rssByBacklog: [(bytes: Int, rssKB: Int)] = []
        var thresholds = [bytes / 8, bytes / 4, bytes / 2]
        while true {
            let backlog = journalBytes()
            if let next = thresholds.first, backlog >= next {
                rssByBacklog.append((backlog, procStatusKB(pid: process.processIdentifier, "VmRSS")))
                thresholds.removeFirst()
            }
            if backlog >= bytes { break }
            for _ in 0..<200 {
                run.log(LogBatch(metrics: (0..<1000).map { MetricPoint(key: "m", value: Double($0), step: Int64(frame * 1000 + $0), timestamp: time) }))
                frame += 1
            }
        }
        _ = try tracker.flush(.durable, timeout: 120)
        let journal = journalBytes()
        rssByBacklog.append((journal, procStatusKB(pid: process.processIdentifier, "VmRSS")))
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        connection.disconnect()
        started = nanos()
        let (again, againSocket) = try startDaemon(binary, home: home, environment: unreachable, arguments: arguments)
        while (try? Connection(socketPath: againSocket, program: "armory-bench")) == nil { usleep(5_000) }
        let seconds = Double(nanos() - started) / 1e9
        let probe = try Connection(socketPath: againSocket, program: "armory-bench")
        let status = try probe.status()
        var segments = 0
        var records = 0
        if case .object(let j)? = status["journal"] {
            segments = Int(j["segments"]?.intValue ?? 0)
            records = Int(j["replayed_records"]?.intValue ?? 0)
        }
        let rss = procStatusKB(pid: again.processIdentifier, "VmRSS")
        probe.disconnect()
        again.terminate()
        again.waitUntilExit()
        return RecoveryFigure(bytes: journal, segments: segments, records: records, seconds: seconds, emptySeconds: emptySeconds, rssKB: rss, rssByBacklog: rssByBacklog)
    }

    static func cpuSeconds(pid: Int32) -> Double {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return 0 }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        let ticks = (Double(fields[11]) ?? 0) + (Double(fields[12]) ?? 0)  // utime, stime
        return ticks / Double(sysconf(Int32(_SC_CLK_TCK)))
    }
}

/// Latency percentiles in microseconds.
struct Percentiles {
    let p50: Double, p99: Double, p999: Double, max: Double

    init(_ nanos: [UInt64]) {
        let sorted = nanos.sorted()
        func at(_ q: Double) -> Double { Double(sorted[min(sorted.count - 1, Int(Double(sorted.count) * q))]) / 1000 }
        p50 = at(0.5)
        p99 = at(0.99)
        p999 = at(0.999)
        max = Double(sorted.last ?? 0) / 1000
    }

    var json: JSONValue {
        .object(["p50": .double((p50 * 100).rounded() / 100), "p99": .double((p99 * 100).rounded() / 100), "p99_9": .double((p999 * 100).rounded() / 100), "max": .double((max * 100).rounded() / 100)])
    }
}

/// A stand-in for systemd's notify socket: a bound datagram socket whose messages a thread reads
/// and drops, so a daemon under test runs its watchdog as under the system unit.
enum NotifySocket {
    /// Binds `path` and returns it (what `NOTIFY_SOCKET` names).
    static func bound(at path: String) throws -> String {
        unlink(path)
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, byte) in path.utf8.prefix(raw.count - 1).enumerated() { raw[i] = byte }
        }
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        guard fd >= 0, bound == 0 else { throw POSIXError(.EADDRINUSE) }
        Thread.detachNewThread {
            var buffer = [UInt8](repeating: 0, count: 4096)
            while recv(fd, &buffer, buffer.count, 0) >= 0 {}
        }
        return path
    }
}
