import ArmoryProtocol
import Foundation
import NIOCore
import ServiceLifecycle
import Synchronization

/// The host's latest sampled figures (MLflow's names without `system/`), for `status`.
public final class HostFigures: Sendable {
    private let figures = Mutex<[String: Double]>([:])

    public init() {}

    public var current: [String: Double] { figures.withLock { $0 } }

    func update(_ new: [String: Double]) { figures.withLock { $0 = new } }
}

/// One sampler for the whole host: every interval it samples the host once and each active run's
/// client process, and logs the figures to every active run that wants them (`system/...`, MLflow's
/// names; each run's steps count its own samples), batched like any other metric.
public final class SystemMetricsService: Service {
    private struct State {
        var sampler: SystemSampler
        /// Per run handle: the next step and the network counters at its first sample.
        var runs: [String: (step: Int64, received: UInt64, sent: UInt64)] = [:]
    }

    private let state: Mutex<State>
    private let services: DaemonServices
    public let interval: Double
    private let loop: EventLoop

    public init(services: DaemonServices, interval: Double, sampler: SystemSampler, loop: EventLoop) {
        self.services = services
        self.interval = interval
        self.loop = loop
        state = Mutex(State(sampler: sampler))
    }

    /// Samples until the graceful shutdown.
    public func run() async throws {
        let sampling = start()
        try? await gracefulShutdown()
        sampling.cancel()
    }

    /// Samples at once (the CPU rates then have a baseline), then every `interval` on `loop`.
    private func start() -> RepeatedTask {
        _ = state.withLock { $0.sampler.sampleHost() }
        let amount = TimeAmount.nanoseconds(Int64(interval * 1e9))
        return loop.scheduleRepeatedTask(initialDelay: amount, delay: amount) { [self] _ in
            tick(now: Self.monotonicSeconds(), nowMs: WallClock.nowMs())
        }
    }

    /// One sample: logged to every active run that wants system metrics.
    public func tick(now: Double, nowMs: Int64) {
        let runs = services.registry.activeRuns.filter { $0.systemMetrics && $0.failure == nil }
        let records: [(RunEntry, LogBatch)] = state.withLock { s in
            let host = s.sampler.sampleHost()
            services.host.update(host.metrics)
            var processes: [Int32: [String: Double]] = [:]
            for pid in Set(runs.filter { $0.connection != nil }.map(\.clientPID)) where pid > 0 {
                processes[pid] = s.sampler.sampleProcess(pid, now: now)
            }
            s.sampler.keepProcesses(Set(processes.keys))
            let active = Set(runs.map(\.handle))
            s.runs = s.runs.filter { active.contains($0.key) }
            return runs.map { run in
                let baseline = s.runs[run.handle] ?? (0, host.networkReceived, host.networkSent)
                var metrics = host.metrics
                metrics["network_receive_megabytes"] = Double(host.networkReceived &- min(host.networkReceived, baseline.received)) / 1e6
                metrics["network_transmit_megabytes"] = Double(host.networkSent &- min(host.networkSent, baseline.sent)) / 1e6
                if run.connection != nil, let process = processes[run.clientPID] {
                    for (name, value) in process { metrics[name] = value }
                }
                s.runs[run.handle] = (baseline.step + 1, baseline.received, baseline.sent)
                let points = metrics.sorted { $0.key < $1.key }.map {
                    MetricPoint(key: "system/" + $0.key, value: $0.value, step: baseline.step, timestamp: nowMs)
                }
                return (run, LogBatch(metrics: points))
            }
        }
        for (run, batch) in records {
            services.destinations.uploader(run.destination).enqueue(run.handle, .log(batch))
        }
    }

    static func monotonicSeconds() -> Double {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return Double(t.tv_sec) + Double(t.tv_nsec) / 1e9
    }
}
