import ArmoryProtocol
import Foundation

/// The `status` reply: what `armoryctl status` shows (schema: `proto/schemas/status-reply.json`).
public enum StatusReport {
    /// One line for systemd's `STATUS=`: state, clients, active runs, backlog, last upload.
    public static func summary(services: DaemonServices) -> String {
        let counters = services.destinations.all.map(\.counterSnapshot)
        let degraded = counters.contains { $0.isDegraded }
        let pending = counters.reduce(0) { $0 + $1.pendingRecords }
        let journalBytes = services.destinations.all.reduce(0) { $0 + $1.journal.snapshotStatistics.bytes }
        let lastSuccess = counters.compactMap(\.lastSuccessMs).max()
        var line =
            "\(degraded ? "degraded" : "running"): \(services.statistics.clients.count) clients, \(services.registry.activeRuns.count) active runs, "
            + "backlog \(pending) records (\(ByteText.render(Int64(journalBytes))) journaled)"
        if let lastSuccess {
            line += ", last upload \(max(0, (WallClock.nowMs() - lastSuccess) / 1000)) s ago"
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

    /// The status as `viewer` may see it: an admin (`DaemonServices.isAdmin`) sees every run,
    /// client and destination; another user sees their own and the daemon's own destination, and
    /// only counts of the others' (`nil`: everything).
    public static func make(services: DaemonServices, viewer: PeerCredentials? = nil) -> StatusReply {
        let everyone = viewer.map(services.isAdmin) ?? true
        func visible(_ uid: UInt32?) -> Bool { everyone || uid == nil || uid == viewer?.uid }
        let allUploaders = services.destinations.all
        // Another user's destinations (their servers, their backlogs) are counted, not shown.
        let uploaders = allUploaders.filter { visible(services.destinations.owner(of: $0)) }
        let allWaiting = services.destinations.awaitingCredentials
        let waiting = allWaiting.filter { visible($0.uid) }
        let counters = uploaders.map(\.counterSnapshot)
        let lastFailure = counters.max { ($0.lastErrorMs ?? .min) < ($1.lastErrorMs ?? .min) }
        let allClients = services.statistics.clients
        let allRuns = services.registry.activeRuns
        let clients = allClients.filter { visible($0.peer.uid) }
        let runs = allRuns.filter { visible($0.ownerUID) }
        var pendingByRun: [String: Int] = [:]
        var backlog: [UInt32: Int] = [:]
        for uploader in uploaders {
            pendingByRun.merge(uploader.pendingByRun) { $0 + $1 }
            backlog.merge(uploader.backlogByUID) { $0 + $1 }
        }
        let journals = uploaders.map { $0.journal.snapshotStatistics }
        let recovery = services.destinations.recoveryReport
        let sessions = services.sessions.counts
        let totals = services.statistics.totals
        let nowMs = WallClock.nowMs()
        func sum<Figure: BinaryInteger>(_ figure: (UploadCounters) -> Figure) -> Int64 { counters.reduce(0) { $0 + Int64(figure($1)) } }
        return StatusReply(
            state: counters.contains { $0.isDegraded } ? "degraded" : "running",
            pid: ProcessInfo.processInfo.processIdentifier, uid: getuid(), systemdUnit: systemdUnit, version: DaemonVersion.current,
            uptimeSeconds: (Date().timeIntervalSince(services.startedAt) * 10).rounded() / 10, socket: services.socketPath,
            destination: services.uploader.destination,
            destinations: zip(uploaders, counters).map { uploader, c in
                let journal = uploader.journal.snapshotStatistics
                return StatusReply.Destination(
                    destination: uploader.destination, state: c.needsCredentials != nil ? "needs-credentials" : c.isDegraded ? "degraded" : "running",
                    pendingRecords: Int64(c.pendingRecords), appliedRecords: Int64(c.appliedRecords), rejectedRecords: Int64(c.rejectedRecords),
                    retries: Int64(c.retries), lastError: c.lastError,
                    live: .init(
                        deadLetters: Int64(c.deadLetters), deadLetterFile: uploader.deadLetters?.path, journalBytes: Int64(journal.bytes),
                        journalSegments: Int64(journal.segments), journalError: journal.lastError))
            }
                + waiting.map { waiting in
                    StatusReply.Destination(
                        destination: waiting.uri, state: "needs-credentials", pendingRecords: Int64(waiting.pendingRecords), appliedRecords: 0,
                        rejectedRecords: 0, retries: 0, lastError: "waiting for a client of uid \(waiting.uid) to name this server with its credentials",
                        ownerUID: waiting.uid, runs: Int64(waiting.runs))
                },
            journal: .init(
                enabled: !journals.isEmpty, bytes: Int64(journals.reduce(0) { $0 + $1.bytes }), segments: Int64(journals.reduce(0) { $0 + $1.segments }),
                replayedRecords: Int64(recovery.records), replayedRuns: Int64(recovery.runs), corruptRecords: Int64(recovery.corruptRecords),
                truncatedBytes: Int64(recovery.truncatedBytes), recoverySeconds: (recovery.seconds * 1000).rounded() / 1000),
            sessions: .init(attached: Int64(sessions.attached), waiting: Int64(sessions.waiting), expired: Int64(sessions.expired), ended: Int64(sessions.ended)),
            clients: clients.map { .init(connection: Int64(bitPattern: $0.connection), uid: $0.peer.uid, pid: $0.peer.pid, client: $0.client, program: $0.program) },
            activeRuns: runs.map { r in
                .init(
                    handle: r.handle, runID: r.runID, experiment: r.experimentName, name: r.name, ownerUID: r.ownerUID, clientPID: r.clientPID,
                    connected: r.connection != nil, pendingRecords: Int64(pendingByRun[r.handle] ?? 0),
                    upload: services.destinations.uploader(r.destination).needsCredentials != nil ? "needs-credentials" : "ok")
            },
            backlogByUID: backlog.filter { visible($0.key) }.mapValues(Int64.init),
            otherUsers: everyone
                ? nil
                : .init(
                    activeRuns: Int64(allRuns.count - runs.count), clients: Int64(allClients.count - clients.count),
                    destinations: Int64(allUploaders.count - uploaders.count + allWaiting.count - waiting.count)),
            pendingRecords: sum(\.pendingRecords), appliedRecords: sum(\.appliedRecords), rejectedRecords: sum(\.rejectedRecords),
            deadLetters: sum(\.deadLetters), metricsAccepted: Int64(totals.metrics), metricsWritten: sum(\.metricsWritten),
            metricsWrittenSystem: sum(\.systemMetricsWritten),
            writeRateMetricsPerSecond: (counters.reduce(0) { $0 + $1.writeRate.perSecond(atMs: nowMs) } * 10).rounded() / 10,
            framesReceived: Int64(totals.frames), errorsSent: Int64(totals.errors),
            lastSuccessMs: counters.compactMap(\.lastSuccessMs).max(), lastError: lastFailure?.lastError, lastErrorMs: lastFailure?.lastErrorMs,
            lastRefusal: services.statistics.lastRefusal.flatMap { visible($0.uid) ? $0.json : nil },
            syncs: services.syncs.all.map(\.status),
            host: services.host.current)
    }
}
