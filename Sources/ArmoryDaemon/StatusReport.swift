import ArmoryProtocol
import Foundation

/// The `status` reply: what `armoryctl status` shows (schema: `proto/schemas/status-reply.json`).
public enum StatusReport {
    public static func make(services: DaemonServices) -> JSONObject {
        let uploaders = services.destinations.all
        let all = uploaders.map { ($0.destination, $0.counterSnapshot) }
        var counters = Uploader.Counters()
        for (_, c) in all {
            counters.pendingRecords += c.pendingRecords
            counters.appliedRecords += c.appliedRecords
            counters.rejectedRecords += c.rejectedRecords
            counters.metricsWritten += c.metricsWritten
            if let t = c.lastSuccessMs, t > (counters.lastSuccessMs ?? 0) { counters.lastSuccessMs = t }
            if let t = c.lastErrorMs, t > (counters.lastErrorMs ?? 0) {
                counters.lastErrorMs = t
                counters.lastError = c.lastError
            }
        }
        let totals = services.statistics.totals
        let clients = services.statistics.clients
        let runs = services.registry.activeRuns
        var o = JSONObject()
        o["state"] = .string(all.contains { $0.1.isDegraded } ? "degraded" : "running")
        o["pid"] = .int(Int64(ProcessInfo.processInfo.processIdentifier))
        o["version"] = .string(DaemonServices.version)
        o["uptime_s"] = .double((Date().timeIntervalSince(services.startedAt) * 10).rounded() / 10)
        o["socket"] = .string(services.socketPath)
        o["destination"] = .string(services.uploader.destination)
        o["destinations"] = .array(all.map { destination, c in
            .object([
                "destination": .string(destination),
                "state": .string(c.isDegraded ? "degraded" : "running"),
                "pending_records": .int(Int64(c.pendingRecords)),
                "applied_records": .int(Int64(c.appliedRecords)),
                "rejected_records": .int(Int64(c.rejectedRecords)),
                "retries": .int(Int64(c.retries)),
                "last_error": c.lastError.map { .string($0) } ?? .null,
            ])
        })
        o["clients"] = .array(clients.map { c in
            .object([
                "connection": .int(Int64(c.connection)),
                "uid": .int(Int64(c.peer.uid)),
                "pid": .int(Int64(c.peer.pid)),
                "client": .string(c.client),
                "program": .string(c.program),
            ])
        })
        o["active_runs"] = .array(runs.map { r in
            .object([
                "handle": .string(r.handle),
                "run_id": r.runID.map { .string($0) } ?? .null,
                "experiment": .string(r.experimentName),
                "name": .string(r.name),
                "owner_uid": .int(Int64(r.ownerUID)),
                "client_pid": .int(Int64(r.clientPID)),
                "connected": .bool(r.connection != nil),
            ])
        })
        o["pending_records"] = .int(Int64(counters.pendingRecords))
        o["applied_records"] = .int(Int64(counters.appliedRecords))
        o["rejected_records"] = .int(Int64(counters.rejectedRecords))
        o["metrics_accepted"] = .int(Int64(totals.metrics))
        o["metrics_written"] = .int(Int64(counters.metricsWritten))
        o["frames_received"] = .int(Int64(totals.frames))
        o["errors_sent"] = .int(Int64(totals.errors))
        o["last_success_ms"] = counters.lastSuccessMs.map { .int($0) } ?? .null
        o["last_error"] = counters.lastError.map { .string($0) } ?? .null
        return o
    }
}
