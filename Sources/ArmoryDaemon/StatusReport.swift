import ArmoryProtocol
import Foundation

/// The `status` reply: what `armoryctl status` shows (schema: `proto/schemas/status-reply.json`).
public enum StatusReport {
    /// One line for systemd's `STATUS=`: state, clients, active runs, backlog, last upload.
    public static func summary(services: DaemonServices) -> String {
        let counters = services.destinations.all.map(\.counterSnapshot)
        let degraded = counters.contains { $0.isDegraded }
        let pending = counters.reduce(0) { $0 + $1.pendingRecords }
        let journalBytes = services.destinations.all.reduce(0) { $0 + ($1.journal?.snapshotStatistics.bytes ?? 0) }
        let lastSuccess = counters.compactMap(\.lastSuccessMs).max()
        var line = "\(degraded ? "degraded" : "running"): \(services.statistics.clients.count) clients, \(services.registry.activeRuns.count) active runs, "
            + "backlog \(pending) records (\(ByteText.render(Int64(journalBytes))) journaled)"
        if let lastSuccess {
            line += ", last upload \(max(0, (DaemonServices.nowMs() - lastSuccess) / 1000)) s ago"
        }
        if degraded, let error = counters.compactMap(\.lastError).last { line += "; last error: \(error.prefix(120))" }
        return line
    }

    /// The systemd unit running the daemon (`INVOCATION_ID` is set for a service), from its
    /// cgroup; `user`: under a user manager (`systemctl --user`).
    static let systemdUnit: (name: String, user: Bool)? = {
        guard ProcessInfo.processInfo.environment["INVOCATION_ID"] != nil else { return nil }
        let cgroup = (try? String(contentsOfFile: "/proc/self/cgroup", encoding: .utf8)) ?? ""
        // The unified hierarchy's line (`0::/…`), else systemd's own (`N:name=systemd:/…`).
        let lines = cgroup.split(separator: "\n")
        let line = lines.first { $0.hasPrefix("0::") && $0.count > 4 } ?? lines.first { $0.contains(":name=systemd:") }
        let path = line.map { String($0.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false).last ?? "") } ?? ""
        let name = path.split(separator: "/").last { $0.hasSuffix(".service") }.map(String.init) ?? "armoryd.service"
        return (name, path.contains("/user@"))
    }()

    /// The status as `viewer` may see it: an admin (`DaemonServices.isAdmin`) sees every run and
    /// client; another user sees their own, and only counts of the others' (`nil`: everything).
    public static func make(services: DaemonServices, viewer: PeerCredentials? = nil) -> JSONObject {
        let everyone = viewer.map(services.isAdmin) ?? true
        let allUploaders = services.destinations.all
        // Another user's destinations (their servers, their backlogs) are counted, not shown.
        let uploaders = everyone ? allUploaders : allUploaders.filter { services.destinations.owner(of: $0).map { $0 == viewer?.uid } ?? true }
        let allWaiting = services.destinations.awaitingCredentials
        let waiting = everyone ? allWaiting : allWaiting.filter { $0.uid == viewer?.uid }
        let all = uploaders.map { ($0.destination, $0.counterSnapshot) }
        var counters = Uploader.Counters()
        for (_, c) in all {
            counters.pendingRecords += c.pendingRecords
            counters.appliedRecords += c.appliedRecords
            counters.rejectedRecords += c.rejectedRecords
            counters.deadLetters += c.deadLetters
            counters.metricsWritten += c.metricsWritten
            counters.systemMetricsWritten += c.systemMetricsWritten
            if let t = c.lastSuccessMs, t > (counters.lastSuccessMs ?? 0) { counters.lastSuccessMs = t }
            if let t = c.lastErrorMs, t > (counters.lastErrorMs ?? 0) {
                counters.lastErrorMs = t
                counters.lastError = c.lastError
            }
        }
        let totals = services.statistics.totals
        let allClients = services.statistics.clients
        let allRuns = services.registry.activeRuns
        let clients = everyone ? allClients : allClients.filter { $0.peer.uid == viewer?.uid }
        let runs = everyone ? allRuns : allRuns.filter { $0.ownerUID == viewer?.uid }
        var pendingByRun: [String: Int] = [:]
        for uploader in uploaders { pendingByRun.merge(uploader.pendingByRun) { $0 + $1 } }
        let nowMs = DaemonServices.nowMs()
        var o = JSONObject()
        o["state"] = .string(all.contains { $0.1.isDegraded } ? "degraded" : "running")
        o["pid"] = .int(Int64(ProcessInfo.processInfo.processIdentifier))
        o["uid"] = .int(Int64(getuid()))
        if let unit = systemdUnit {
            o["systemd_unit"] = .string(unit.name)
            o["systemd_user"] = .bool(unit.user)
        }
        o["version"] = .string(DaemonServices.version)
        o["uptime_s"] = .double((Date().timeIntervalSince(services.startedAt) * 10).rounded() / 10)
        o["socket"] = .string(services.socketPath)
        o["destination"] = .string(services.uploader.destination)
        o["destinations"] = .array(zip(uploaders, all).map { uploader, pair in
            let (destination, c) = pair
            let journal = uploader.journal?.snapshotStatistics
            return .object([
                "destination": .string(destination),
                "state": .string(c.needsCredentials != nil ? "needs-credentials" : c.isDegraded ? "degraded" : "running"),
                "pending_records": .int(Int64(c.pendingRecords)),
                "applied_records": .int(Int64(c.appliedRecords)),
                "rejected_records": .int(Int64(c.rejectedRecords)),
                "dead_letters": .int(Int64(c.deadLetters)),
                "dead_letter_file": uploader.deadLetters.map { .string($0.path) } ?? .null,
                "retries": .int(Int64(c.retries)),
                "last_error": c.lastError.map { .string($0) } ?? .null,
                "journal_bytes": .int(Int64(journal?.bytes ?? 0)),
                "journal_segments": .int(Int64(journal?.segments ?? 0)),
                "journal_error": journal?.lastError.map { .string($0) } ?? .null,
            ])
        } + waiting.map { waiting in
            .object([
                "destination": .string(waiting.uri),
                "state": .string("needs-credentials"),
                "owner_uid": .int(Int64(waiting.uid)),
                "pending_records": .int(Int64(waiting.pendingRecords)),
                "applied_records": .int(0),
                "rejected_records": .int(0),
                "retries": .int(0),
                "last_error": .string("waiting for a client of uid \(waiting.uid) to name this server with its credentials"),
                "runs": .int(Int64(waiting.runs)),
            ])
        })
        let recovery = services.destinations.recoveryReport
        let journals = uploaders.compactMap { $0.journal?.snapshotStatistics }
        o["journal"] = .object([
            "enabled": .bool(!journals.isEmpty),
            "bytes": .int(Int64(journals.reduce(0) { $0 + $1.bytes })),
            "segments": .int(Int64(journals.reduce(0) { $0 + $1.segments })),
            "replayed_records": .int(Int64(recovery.records)),
            "replayed_runs": .int(Int64(recovery.runs)),
            "corrupt_records": .int(Int64(recovery.corruptRecords)),
            "truncated_bytes": .int(Int64(recovery.truncatedBytes)),
            "recovery_s": .double((recovery.seconds * 1000).rounded() / 1000),
        ])
        let sessions = services.sessions.counts
        o["sessions"] = .object([
            "attached": .int(Int64(sessions.attached)),
            "waiting": .int(Int64(sessions.waiting)),
            "expired": .int(Int64(sessions.expired)),
        ])
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
                "pending_records": .int(Int64(pendingByRun[r.handle] ?? 0)),
                "upload": .string(services.destinations.uploader(r.destination).needsCredentials != nil ? "needs-credentials" : "ok"),
            ])
        })
        var backlog: [UInt32: Int] = [:]
        for uploader in uploaders { backlog.merge(uploader.backlogByUID) { $0 + $1 } }
        o["backlog_by_uid"] = .object(JSONObject(uniqueKeysWithValues: backlog.filter { everyone || $0.key == viewer?.uid }.sorted { $0.key < $1.key }
            .map { (String($0.key), .int(Int64($0.value))) }))
        if !everyone {
            o["other_users"] = .object(["active_runs": .int(Int64(allRuns.count - runs.count)), "clients": .int(Int64(allClients.count - clients.count)),
                                        "destinations": .int(Int64(allUploaders.count - uploaders.count + allWaiting.count - waiting.count))])
        }
        o["pending_records"] = .int(Int64(counters.pendingRecords))
        o["applied_records"] = .int(Int64(counters.appliedRecords))
        o["rejected_records"] = .int(Int64(counters.rejectedRecords))
        o["dead_letters"] = .int(Int64(counters.deadLetters))
        o["metrics_accepted"] = .int(Int64(totals.metrics))
        o["metrics_written"] = .int(Int64(counters.metricsWritten))
        o["metrics_written_system"] = .int(Int64(counters.systemMetricsWritten))
        o["write_rate_metrics_per_s"] = .double((all.reduce(0) { $0 + $1.1.writeRate.perSecond(atMs: nowMs) } * 10).rounded() / 10)
        o["frames_received"] = .int(Int64(totals.frames))
        o["errors_sent"] = .int(Int64(totals.errors))
        o["last_success_ms"] = counters.lastSuccessMs.map { .int($0) } ?? .null
        o["last_error"] = counters.lastError.map { .string($0) } ?? .null
        o["last_error_ms"] = counters.lastErrorMs.map { .int($0) } ?? .null
        o["last_refusal"] = services.statistics.lastRefusal.flatMap { everyone || $0.uid == viewer?.uid ? .object($0.json) : nil } ?? .null
        o["syncs"] = .array(services.syncs.all.map(\.json))
        o["host"] = .object(JSONObject(uniqueKeysWithValues: services.host.current.sorted { $0.key < $1.key }.map { ($0.key, .double($0.value)) }))
        return o
    }
}
