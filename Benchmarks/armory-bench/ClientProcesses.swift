import ArgumentParser
import ArmoryProtocol
import ArmoryTrack
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// What one benchmark client process does once told to go: `metrics` metrics into one chain run,
/// in frames of `perFrame` metrics (1: `logMetric`; more: one `log` frame of distinct keys per step).
struct ClientWorkload: Sendable {
    var socketPath: String
    var evaluation: String
    var metrics: Int
    var perFrame: Int

    /// Runs the workload in this process: connects and starts its run, says `ready` on stdout,
    /// waits for a line on stdin, logs, waits until everything is confirmed uploaded, ends.
    func runHere(name: String) throws {
        let tracker = try Tracker(socketPath: socketPath, program: "armory-bench")
        let evaluation = tracker.evaluation(self.evaluation)
        let run = try evaluation.addChain(name).start()
        FileHandle.standardOutput.write(Data("ready\n".utf8))
        guard readLine() != nil else { return }
        if perFrame == 1 {
            for i in 0..<metrics { run.logMetric("m", Double(i), step: Int64(i)) }
        } else {
            let keys = (0..<perFrame).map { "m\($0)" }
            let time = Int64(Date().timeIntervalSince1970 * 1000)
            for step in 0..<(metrics / perFrame) {
                run.log(LogBatch(metrics: keys.enumerated().map { MetricPoint(key: $1, value: Double($0), step: Int64(step), timestamp: time + Int64(step)) }))
            }
        }
        let reply = try tracker.flush(.uploaded, timeout: 1800)
        guard reply.complete else { throw ValidationError("upload did not complete") }
        try evaluation.end()
        tracker.connection.disconnect()
    }
}

/// Benchmark clients as separate processes (this executable in client mode), each with its own
/// connection and run, started and connected before the clock starts.
final class ClientProcesses {
    private var processes: [(process: Process, input: FileHandle, output: FileHandle)] = []

    /// Starts `count` clients of `workload` and waits until every one is connected with its run started.
    init(_ count: Int, _ workload: ClientWorkload) throws {
        let executable = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        for c in 0..<count {
            let process = Process()
            process.executableURL = executable
            process.arguments = [
                "--client-socket", workload.socketPath, "--client-evaluation", workload.evaluation, "--client-name", "client-\(c)",
                "--client-metrics", String(workload.metrics), "--client-per-frame", String(workload.perFrame),
            ]
            let input = Pipe()
            let output = Pipe()
            process.standardInput = input
            process.standardOutput = output
            try process.run()
            processes.append((process, input.fileHandleForWriting, output.fileHandleForReading))
        }
        for (index, client) in processes.enumerated() {
            var line: [UInt8] = []
            while true {
                let byte = client.output.readData(ofLength: 1)
                if byte.isEmpty { throw ValidationError("benchmark client \(index) exited before it was ready") }
                if byte.first == UInt8(ascii: "\n") { break }
                line.append(contentsOf: byte)
            }
            guard String(decoding: line, as: UTF8.self) == "ready" else { throw ValidationError("benchmark client \(index) said \(String(decoding: line, as: UTF8.self))") }
        }
    }

    /// Tells every client to go and waits until all of them confirmed their uploads and exited;
    /// returns the seconds that took.
    func go() throws -> Double {
        let start = ArmoryBench.nanos()
        for client in processes { client.input.write(Data("go\n".utf8)) }
        var failed = 0
        for client in processes {
            client.process.waitUntilExit()
            if client.process.terminationStatus != 0 { failed += 1 }
        }
        let seconds = Double(ArmoryBench.nanos() - start) / 1e9
        if failed > 0 { throw ValidationError("\(failed) of \(processes.count) benchmark clients failed") }
        return seconds
    }
}
