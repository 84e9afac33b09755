/// The daemon's answer to `status` (schema: `proto/schemas/status-reply.json`): what the daemon
/// builds and `armoryctl` reads, one type on both sides of the socket.
public struct StatusReply: Sendable, Equatable {
    /// `running`, or `degraded` while a destination refuses records or fails.
    public var state: String
    public var pid: Int32
    /// The uid the daemon runs as.
    public var uid: UInt32
    /// The systemd unit running the daemon, and whether under a user manager (`nil`: not a unit).
    public var systemdUnit: (name: String, user: Bool)?
    public var version: String
    public var uptimeSeconds: Double
    public var socket: String
    /// The daemon's own destination.
    public var destination: String
    public var destinations: [Destination]
    public var journal: Journal
    public var sessions: Sessions
    public var clients: [Client]
    public var activeRuns: [ActiveRun]
    /// Journal bytes not yet settled per client uid.
    public var backlogByUID: [UInt32: Int64]
    /// For a viewer who is not an admin: what other users have, as counts.
    public var otherUsers: OtherUsers?
    public var pendingRecords: Int64
    public var appliedRecords: Int64
    public var rejectedRecords: Int64
    public var deadLetters: Int64
    public var metricsAccepted: Int64
    public var metricsWritten: Int64
    public var metricsWrittenSystem: Int64
    public var writeRateMetricsPerSecond: Double
    public var framesReceived: Int64
    public var errorsSent: Int64
    public var lastSuccessMs: Int64?
    public var lastError: String?
    public var lastErrorMs: Int64?
    /// The last error sent to a client (`time_ms`, `code`, `op`, `key`, `message`, `uid`, `pid`).
    public var lastRefusal: JSONObject?
    /// Sync jobs, as `sync_status` lists them.
    public var syncs: [SyncJobStatus]
    /// The host's latest figures (CPU, memory, disk, GPUs), by name.
    public var host: [String: Double]

    /// One destination: a live one (its counters and journal), or one whose journal waits for a
    /// client's credentials (`ownerUID`, `runs`).
    public struct Destination: Sendable, Equatable {
        public var destination: String
        /// `running`, `degraded` or `needs-credentials`.
        public var state: String
        public var pendingRecords: Int64
        public var appliedRecords: Int64
        public var rejectedRecords: Int64
        public var retries: Int64
        public var lastError: String?
        /// A live destination's dead letters, journal and their files.
        public var live: Live?
        /// A journal waiting for a client's credentials: the uid whose client must name the server again.
        public var ownerUID: UInt32?
        public var runs: Int64?

        /// What a live destination adds.
        public struct Live: Sendable, Equatable {
            public var deadLetters: Int64
            public var deadLetterFile: String?
            public var journalBytes: Int64
            public var journalSegments: Int64
            public var journalError: String?

            public init(deadLetters: Int64, deadLetterFile: String?, journalBytes: Int64, journalSegments: Int64, journalError: String?) {
                self.deadLetters = deadLetters
                self.deadLetterFile = deadLetterFile
                self.journalBytes = journalBytes
                self.journalSegments = journalSegments
                self.journalError = journalError
            }
        }

        public init(
            destination: String, state: String, pendingRecords: Int64, appliedRecords: Int64, rejectedRecords: Int64, retries: Int64,
            lastError: String?, live: Live? = nil, ownerUID: UInt32? = nil, runs: Int64? = nil
        ) {
            self.destination = destination
            self.state = state
            self.pendingRecords = pendingRecords
            self.appliedRecords = appliedRecords
            self.rejectedRecords = rejectedRecords
            self.retries = retries
            self.lastError = lastError
            self.live = live
            self.ownerUID = ownerUID
            self.runs = runs
        }
    }

    /// The journals together, and what the last start replayed from them.
    public struct Journal: Sendable, Equatable {
        public var enabled: Bool
        public var bytes: Int64
        public var segments: Int64
        public var replayedRecords: Int64
        public var replayedRuns: Int64
        public var corruptRecords: Int64
        public var truncatedBytes: Int64
        public var recoverySeconds: Double

        public init(enabled: Bool, bytes: Int64, segments: Int64, replayedRecords: Int64, replayedRuns: Int64, corruptRecords: Int64, truncatedBytes: Int64, recoverySeconds: Double) {
            self.enabled = enabled
            self.bytes = bytes
            self.segments = segments
            self.replayedRecords = replayedRecords
            self.replayedRuns = replayedRuns
            self.corruptRecords = corruptRecords
            self.truncatedBytes = truncatedBytes
            self.recoverySeconds = recoverySeconds
        }
    }

    /// Client sessions: carried by a connection, waiting for their client to resume, expired,
    /// ended by their client (`bye`).
    public struct Sessions: Sendable, Equatable {
        public var attached: Int64
        public var waiting: Int64
        public var expired: Int64
        public var ended: Int64

        public init(attached: Int64, waiting: Int64, expired: Int64, ended: Int64) {
            self.attached = attached
            self.waiting = waiting
            self.expired = expired
            self.ended = ended
        }
    }

    /// A connected client.
    public struct Client: Sendable, Equatable {
        public var connection: Int64
        public var uid: UInt32
        public var pid: Int32
        public var client: String
        public var program: String

        public init(connection: Int64, uid: UInt32, pid: Int32, client: String, program: String) {
            self.connection = connection
            self.uid = uid
            self.pid = pid
            self.client = client
            self.program = program
        }
    }

    /// A run still running, with what it has not uploaded yet.
    public struct ActiveRun: Sendable, Equatable {
        public var handle: String
        public var runID: String?
        public var experiment: String
        public var name: String
        public var ownerUID: UInt32
        public var clientPID: Int32
        public var connected: Bool
        public var pendingRecords: Int64
        /// `ok`, or `needs-credentials` while its destination refuses the daemon's credentials.
        public var upload: String

        public init(handle: String, runID: String?, experiment: String, name: String, ownerUID: UInt32, clientPID: Int32, connected: Bool, pendingRecords: Int64, upload: String) {
            self.handle = handle
            self.runID = runID
            self.experiment = experiment
            self.name = name
            self.ownerUID = ownerUID
            self.clientPID = clientPID
            self.connected = connected
            self.pendingRecords = pendingRecords
            self.upload = upload
        }
    }

    /// What other users have, for a viewer who may not see it.
    public struct OtherUsers: Sendable, Equatable {
        public var activeRuns: Int64
        public var clients: Int64
        public var destinations: Int64

        public init(activeRuns: Int64, clients: Int64, destinations: Int64) {
            self.activeRuns = activeRuns
            self.clients = clients
            self.destinations = destinations
        }
    }

    public init(
        state: String, pid: Int32, uid: UInt32, systemdUnit: (name: String, user: Bool)?, version: String, uptimeSeconds: Double, socket: String,
        destination: String, destinations: [Destination], journal: Journal, sessions: Sessions, clients: [Client], activeRuns: [ActiveRun],
        backlogByUID: [UInt32: Int64], otherUsers: OtherUsers?, pendingRecords: Int64, appliedRecords: Int64, rejectedRecords: Int64,
        deadLetters: Int64, metricsAccepted: Int64, metricsWritten: Int64, metricsWrittenSystem: Int64, writeRateMetricsPerSecond: Double,
        framesReceived: Int64, errorsSent: Int64, lastSuccessMs: Int64?, lastError: String?, lastErrorMs: Int64?, lastRefusal: JSONObject?,
        syncs: [SyncJobStatus], host: [String: Double]
    ) {
        self.state = state
        self.pid = pid
        self.uid = uid
        self.systemdUnit = systemdUnit
        self.version = version
        self.uptimeSeconds = uptimeSeconds
        self.socket = socket
        self.destination = destination
        self.destinations = destinations
        self.journal = journal
        self.sessions = sessions
        self.clients = clients
        self.activeRuns = activeRuns
        self.backlogByUID = backlogByUID
        self.otherUsers = otherUsers
        self.pendingRecords = pendingRecords
        self.appliedRecords = appliedRecords
        self.rejectedRecords = rejectedRecords
        self.deadLetters = deadLetters
        self.metricsAccepted = metricsAccepted
        self.metricsWritten = metricsWritten
        self.metricsWrittenSystem = metricsWrittenSystem
        self.writeRateMetricsPerSecond = writeRateMetricsPerSecond
        self.framesReceived = framesReceived
        self.errorsSent = errorsSent
        self.lastSuccessMs = lastSuccessMs
        self.lastError = lastError
        self.lastErrorMs = lastErrorMs
        self.lastRefusal = lastRefusal
        self.syncs = syncs
        self.host = host
    }

    /// Equal when they say the same (the systemd unit is a tuple).
    public static func == (a: StatusReply, b: StatusReply) -> Bool { a.json == b.json }
}

extension StatusReply {
    public var json: JSONObject {
        var o: JSONObject = [
            "state": .string(state), "pid": .int(Int64(pid)), "uid": .int(Int64(uid)), "version": .string(version),
            "uptime_s": .double(uptimeSeconds), "socket": .string(socket), "destination": .string(destination),
        ]
        if let unit = systemdUnit {
            o["systemd_unit"] = .string(unit.name)
            o["systemd_user"] = .bool(unit.user)
        }
        o["destinations"] = .array(destinations.map { .object($0.json) })
        o["journal"] = .object([
            "enabled": .bool(journal.enabled), "bytes": .int(journal.bytes), "segments": .int(journal.segments),
            "replayed_records": .int(journal.replayedRecords), "replayed_runs": .int(journal.replayedRuns),
            "corrupt_records": .int(journal.corruptRecords), "truncated_bytes": .int(journal.truncatedBytes), "recovery_s": .double(journal.recoverySeconds),
        ])
        o["sessions"] = .object([
            "attached": .int(sessions.attached), "waiting": .int(sessions.waiting), "expired": .int(sessions.expired), "ended": .int(sessions.ended),
        ])
        o["clients"] = .array(
            clients.map { c in
                .object(["connection": .int(c.connection), "uid": .int(Int64(c.uid)), "pid": .int(Int64(c.pid)), "client": .string(c.client), "program": .string(c.program)])
            })
        o["active_runs"] = .array(
            activeRuns.map { r in
                .object([
                    "handle": .string(r.handle), "run_id": .optional(r.runID), "experiment": .string(r.experiment), "name": .string(r.name),
                    "owner_uid": .int(Int64(r.ownerUID)), "client_pid": .int(Int64(r.clientPID)), "connected": .bool(r.connected),
                    "pending_records": .int(r.pendingRecords), "upload": .string(r.upload),
                ])
            })
        o["backlog_by_uid"] = .object(JSONObject(uniqueKeysWithValues: backlogByUID.sorted { $0.key < $1.key }.map { (String($0.key), .int($0.value)) }))
        if let otherUsers {
            o["other_users"] = .object(["active_runs": .int(otherUsers.activeRuns), "clients": .int(otherUsers.clients), "destinations": .int(otherUsers.destinations)])
        }
        o["pending_records"] = .int(pendingRecords)
        o["applied_records"] = .int(appliedRecords)
        o["rejected_records"] = .int(rejectedRecords)
        o["dead_letters"] = .int(deadLetters)
        o["metrics_accepted"] = .int(metricsAccepted)
        o["metrics_written"] = .int(metricsWritten)
        o["metrics_written_system"] = .int(metricsWrittenSystem)
        o["write_rate_metrics_per_s"] = .double(writeRateMetricsPerSecond)
        o["frames_received"] = .int(framesReceived)
        o["errors_sent"] = .int(errorsSent)
        o["last_success_ms"] = lastSuccessMs.map { .int($0) } ?? .null
        o["last_error"] = .optional(lastError)
        o["last_error_ms"] = lastErrorMs.map { .int($0) } ?? .null
        o["last_refusal"] = lastRefusal.map { .object($0) } ?? .null
        o["syncs"] = .array(syncs.map { .object($0.json) })
        o["host"] = .object(JSONObject(uniqueKeysWithValues: host.sorted { $0.key < $1.key }.map { ($0.key, .double($0.value)) }))
        return o
    }

    /// Reads a status reply; `nil` when a member every daemon sends is missing.
    public init?(json o: JSONObject) {
        guard let state = o["state"]?.stringValue, let pid = o["pid"]?.intValue, let version = o["version"]?.stringValue,
            let journal = o["journal"]?.objectValue, let sessions = o["sessions"]?.objectValue
        else { return nil }
        self.state = state
        self.pid = Int32(truncatingIfNeeded: pid)
        uid = UInt32(truncatingIfNeeded: o["uid"]?.intValue ?? 0)
        systemdUnit = o["systemd_unit"]?.stringValue.map { ($0, o["systemd_user"]?.boolValue ?? false) }
        self.version = version
        uptimeSeconds = o["uptime_s"]?.doubleValue ?? 0
        socket = o["socket"]?.stringValue ?? ""
        destination = o["destination"]?.stringValue ?? ""
        destinations = (o["destinations"]?.arrayValue ?? []).compactMap { $0.objectValue.map(Destination.init(json:)) }
        func int(_ object: JSONObject, _ key: String) -> Int64 { object[key]?.intValue ?? 0 }
        self.journal = Journal(
            enabled: journal["enabled"]?.boolValue ?? false, bytes: int(journal, "bytes"), segments: int(journal, "segments"),
            replayedRecords: int(journal, "replayed_records"), replayedRuns: int(journal, "replayed_runs"),
            corruptRecords: int(journal, "corrupt_records"), truncatedBytes: int(journal, "truncated_bytes"),
            recoverySeconds: journal["recovery_s"]?.doubleValue ?? 0)
        self.sessions = Sessions(
            attached: int(sessions, "attached"), waiting: int(sessions, "waiting"), expired: int(sessions, "expired"), ended: int(sessions, "ended"))
        clients = (o["clients"]?.arrayValue ?? []).compactMap(\.objectValue).map { c in
            Client(
                connection: int(c, "connection"), uid: UInt32(truncatingIfNeeded: int(c, "uid")), pid: Int32(truncatingIfNeeded: int(c, "pid")),
                client: c["client"]?.stringValue ?? "", program: c["program"]?.stringValue ?? "")
        }
        activeRuns = (o["active_runs"]?.arrayValue ?? []).compactMap(\.objectValue).map { r in
            ActiveRun(
                handle: r["handle"]?.stringValue ?? "", runID: r["run_id"]?.stringValue, experiment: r["experiment"]?.stringValue ?? "",
                name: r["name"]?.stringValue ?? "", ownerUID: UInt32(truncatingIfNeeded: int(r, "owner_uid")),
                clientPID: Int32(truncatingIfNeeded: int(r, "client_pid")), connected: r["connected"]?.boolValue ?? false,
                pendingRecords: int(r, "pending_records"), upload: r["upload"]?.stringValue ?? "ok")
        }
        backlogByUID = Dictionary(
            uniqueKeysWithValues: (o["backlog_by_uid"]?.objectValue ?? [:]).compactMap { key, value in
                UInt32(key).flatMap { uid in value.intValue.map { (uid, $0) } }
            })
        otherUsers = o["other_users"]?.objectValue.map { OtherUsers(activeRuns: int($0, "active_runs"), clients: int($0, "clients"), destinations: int($0, "destinations")) }
        pendingRecords = int(o, "pending_records")
        appliedRecords = int(o, "applied_records")
        rejectedRecords = int(o, "rejected_records")
        deadLetters = int(o, "dead_letters")
        metricsAccepted = int(o, "metrics_accepted")
        metricsWritten = int(o, "metrics_written")
        metricsWrittenSystem = int(o, "metrics_written_system")
        writeRateMetricsPerSecond = o["write_rate_metrics_per_s"]?.doubleValue ?? 0
        framesReceived = int(o, "frames_received")
        errorsSent = int(o, "errors_sent")
        lastSuccessMs = o["last_success_ms"]?.intValue
        lastError = o["last_error"]?.stringValue
        lastErrorMs = o["last_error_ms"]?.intValue
        lastRefusal = o["last_refusal"]?.objectValue
        syncs = (o["syncs"]?.arrayValue ?? []).compactMap(\.objectValue).compactMap(SyncJobStatus.init(json:))
        host = Dictionary(uniqueKeysWithValues: (o["host"]?.objectValue ?? [:]).compactMap { key, value in value.doubleValue.map { (key, $0) } })
    }
}

extension StatusReply.Destination {
    public var json: JSONObject {
        var o: JSONObject = [
            "destination": .string(destination), "state": .string(state), "pending_records": .int(pendingRecords),
            "applied_records": .int(appliedRecords), "rejected_records": .int(rejectedRecords), "retries": .int(retries), "last_error": .optional(lastError),
        ]
        if let live {
            o["dead_letters"] = .int(live.deadLetters)
            o["dead_letter_file"] = .optional(live.deadLetterFile)
            o["journal_bytes"] = .int(live.journalBytes)
            o["journal_segments"] = .int(live.journalSegments)
            o["journal_error"] = .optional(live.journalError)
        }
        if let ownerUID { o["owner_uid"] = .int(Int64(ownerUID)) }
        if let runs { o["runs"] = .int(runs) }
        return o
    }

    public init(json d: JSONObject) {
        func int(_ key: String) -> Int64 { d[key]?.intValue ?? 0 }
        self.init(
            destination: d["destination"]?.stringValue ?? "", state: d["state"]?.stringValue ?? "", pendingRecords: int("pending_records"),
            appliedRecords: int("applied_records"), rejectedRecords: int("rejected_records"), retries: int("retries"),
            lastError: d["last_error"]?.stringValue,
            live: d["journal_bytes"] == nil
                ? nil
                : Live(
                    deadLetters: int("dead_letters"), deadLetterFile: d["dead_letter_file"]?.stringValue,
                    journalBytes: int("journal_bytes"), journalSegments: int("journal_segments"),
                    journalError: d["journal_error"]?.stringValue),
            ownerUID: d["owner_uid"]?.intValue.map { UInt32(truncatingIfNeeded: $0) }, runs: d["runs"]?.intValue)
    }
}
