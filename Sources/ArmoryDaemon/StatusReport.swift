import ArmoryProtocol
import Foundation

/// The `status` reply: what `armoryctl status` shows (schema: `proto/schemas/status-reply.json`).
public enum StatusReport {
    public static func make(services: DaemonServices) -> JSONObject {
        let counters = services.uploader.counterSnapshot
        let totals = services.statistics.totals
        let clients = services.statistics.clients
        let runs = services.registry.activeRuns
        var o = JSONObject()
        o["state"] = .string(counters.isDegraded ? "degraded" : "running")
        o["pid"] = .int(Int64(ProcessInfo.processInfo.processIdentifier))
        o["version"] = .string(DaemonServices.version)
        o["uptime_s"] = .double((Date().timeIntervalSince(services.startedAt) * 10).rounded() / 10)
        o["socket"] = .string(services.socketPath)
        o["destination"] = .string(services.uploader.destination)
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
