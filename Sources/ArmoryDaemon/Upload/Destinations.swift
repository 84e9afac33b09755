import ArmoryProtocol
import Foundation
import MLflow
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Which destination a run or a session writes to: the daemon's own (`primary`), or one an
/// evaluation named in `hello` (its URL and who it writes as, or a local store's `file://` URI).
public struct DestinationKey: Hashable, Sendable {
    let raw: String
    /// The daemon's own destination.
    public static let primary = DestinationKey(raw: "")
    public var isPrimary: Bool { raw.isEmpty }
}

/// Every destination the daemon writes to: its own (the primary uploader), and the MLflow servers
/// or stores that evaluations name in `hello` (their process's `MLFLOW_TRACKING_URI` and
/// credentials), each with an uploader and a journal of its own, created on first use.
///
/// A destination's journal lives in its own directory under the journal root, with a
/// `destination` file naming the URI (never credentials) and where its credentials come from.
/// At start every journal is replayed: the daemon's own destinations resume at once; one whose
/// credentials came from a client waits (`needs-credentials`) until a client of the same uid
/// names that server again.
public final class Destinations: Sendable {
    /// How to make the uploader of a destination an evaluation names.
    public struct Settings: Sendable {
        public var bounds: UploadBounds
        public var uploadConcurrency: Int
        public var flushInterval: Double
        public var requestTimeout: Double
        /// TLS settings of the daemon (a client's certificate paths are its own files).
        public var tls: MLflowTLSSettings
        /// Where journals live, one directory per destination.
        public var journalRoot: String
        public var journalOptions: Journal.Options
        /// Where each destination's dead-letter file lives (`nil`: refused records are dropped).
        public var deadLetterRoot: String?
        /// Credentials per server (`[<tracking URI>]` sections, MLflow's format), read at start and
        /// on `reloadCredentials` (SIGHUP), later files winning: `/etc/armory/credentials` (the
        /// system daemon's), then `$ARMORY_HOME/credentials`.
        public var credentialsFiles: [String]
        /// Destinations one uid may name besides the daemon's own (`TOO_MANY_DESTINATIONS` past it).
        public var maxDestinationsPerUser: Int
        /// The daemon's own MLflow credentials (for journals of its destinations after a restart).
        public var daemonCredentials: MLflowCredentials

        /// How this daemon builds a destination's sink.
        public var sinks: SinkFactory { SinkFactory(uploadConcurrency: uploadConcurrency, requestTimeout: requestTimeout, tls: tls) }

        public init(
            bounds: UploadBounds = .init(), uploadConcurrency: Int = 4, flushInterval: Double = 1, requestTimeout: Double = 30, tls: MLflowTLSSettings = .init(),
            journalRoot: String, journalOptions: Journal.Options = .init(), deadLetterRoot: String? = nil, credentialsFiles: [String] = [], maxDestinationsPerUser: Int = 4,
            daemonCredentials: MLflowCredentials = .init()
        ) {
            self.bounds = bounds
            self.uploadConcurrency = uploadConcurrency
            self.flushInterval = flushInterval
            self.requestTimeout = requestTimeout
            self.tls = tls
            self.journalRoot = journalRoot
            self.journalOptions = journalOptions
            self.deadLetterRoot = deadLetterRoot
            self.credentialsFiles = credentialsFiles
            self.maxDestinationsPerUser = maxDestinationsPerUser
            self.daemonCredentials = daemonCredentials
        }
    }

    /// What a journal directory's `destination` file says.
    struct JournalIdentity: Equatable {
        /// Where the journal's records go, without user info.
        var uri: String
        /// `none`, `daemon` (its own configuration) or `client` (sent over the socket, not kept).
        var credentials: String
        var uid: UInt32

        var json: JSONObject { ["uri": .string(uri), "credentials": .string(credentials), "uid": .int(Int64(uid))] }

        init(uri: String, credentials: String, uid: UInt32) {
            self.uri = uri
            self.credentials = credentials
            self.uid = uid
        }

        init?(file: String) {
            guard let bytes = FileManager.default.contents(atPath: file), case .object(let o)? = try? JSONParser.parse(Array(bytes)),
                let uri = o["uri"]?.stringValue, let source = o["credentials"]?.stringValue, let uid = o["uid"]?.intValue
            else { return nil }
            self.init(uri: uri, credentials: source, uid: UInt32(truncatingIfNeeded: uid))
        }
    }

    /// A journal replayed at start whose destination waits for a client's credentials.
    public struct AwaitingCredentials: Sendable {
        public var uri: String
        public var uid: UInt32
        public var pendingRecords: Int
        public var runs: Int
        let journal: Journal
        let recovery: Journal.Recovery
    }

    /// What recovery found, for the log and `status`.
    public struct RecoveryReport: Sendable {
        public var journals = 0
        public var records = 0
        public var runs = 0
        public var corruptRecords = 0
        public var truncatedBytes = 0
        public var bytes = 0
        public var seconds = 0.0
        /// Journals that could not be reopened, with why.
        public var errors: [String] = []
        /// Spool files that unsettled artifact records name.
        public var spoolFiles = Set<String>()
    }

    public let primary: Uploader
    /// The primary destination's identity, so a client naming the same server uses it.
    private let primaryKey: DestinationKey?
    private let settings: Settings
    private let registry: RunRegistry
    private let others = Mutex<[DestinationKey: Uploader]>([:])
    /// The uid each destination other than the primary writes for (whose client may rotate its credentials).
    private let owners = Mutex<[DestinationKey: UInt32]>([:])
    private let awaiting = Mutex<[String: AwaitingCredentials]>([:])
    private let report = Mutex(RecoveryReport())
    /// Told about runs restored from a journal that are still running (their clients are gone).
    private let onRestoredRuns: @Sendable ([String]) -> Void
    /// Told about client sessions restored from a journal (waiting for their clients to resume).
    private let onRestoredSessions: @Sendable ([SessionRecord]) -> Void

    /// Replays the primary's journal (if any) and the journals of other destinations.
    public init(
        primarySink: any RecordSink, primaryServer: MLflowDestination? = nil, settings: Settings, registry: RunRegistry,
        onRestoredRuns: @escaping @Sendable ([String]) -> Void = { _ in },
        onRestoredSessions: @escaping @Sendable ([SessionRecord]) -> Void = { _ in }
    ) throws(ProtocolError) {
        self.primaryKey = primaryServer.map(Self.key)
        self.settings = settings
        self.registry = registry
        self.onRestoredRuns = onRestoredRuns
        self.onRestoredSessions = onRestoredSessions
        var found: [(String, JournalIdentity)] = []
        let root = settings.journalRoot
        for name in ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []).sorted() {
            if let identity = JournalIdentity(file: root + "/" + name + "/destination") { found.append((root + "/" + name, identity)) }
        }
        let source = primaryServer.map { $0.credentials.isEmpty ? "none" : "daemon" } ?? "none"
        let mine = found.first { $0.1.uri == primarySink.destination && $0.1.credentials != "client" }
        found.removeAll { $0.0 == mine?.0 }
        let opened = try Self.openJournal(at: mine?.0, identity: JournalIdentity(uri: primarySink.destination, credentials: source, uid: getuid()), sink: primarySink, settings: settings)
        primary = Self.uploader(sink: primarySink, journal: opened.0, flushInterval: primarySink.assignsRunIDs ? 0 : settings.flushInterval, settings: settings, registry: registry)
        primary.start()
        restore(opened.1, into: primary, key: .primary)
        for (directory, identity) in found { recover(directory: directory, identity: identity) }
        reloadCredentials()
    }

    /// Reads the credentials file again (at start, and on SIGHUP or `systemctl reload`): every
    /// destination on a server it names uses its credentials from now on, and what waited for
    /// credentials (refused ones, or a journal whose client's credentials died with the previous
    /// daemon) is sent at once. Returns the servers whose credentials changed.
    @discardableResult
    public func reloadCredentials() -> [String] {
        var servers: [String: MLflowCredentials] = [:]
        for file in settings.credentialsFiles { servers.merge(MLflowCredentials.perServer(file: file)) { $1 } }
        var changed: [String] = []
        for uploader in all {
            if let url = uploader.serverURL, let credentials = servers[url], uploader.useCredentials(credentials) { changed.append(url) }
        }
        for waiting in awaitingCredentials {
            guard let credentials = servers[waiting.uri] else { continue }
            let destination = MLflowDestination(trackingURI: waiting.uri, credentials: credentials, tls: settings.tls)
            let identity = JournalIdentity(uri: waiting.uri, credentials: "client", uid: waiting.uid)
            do {
                try create(Self.key(destination), identity: identity) { () throws(ProtocolError) in try settings.sinks.server(destination) }
                changed.append(waiting.uri)
            } catch {
                report.withLock { $0.errors.append("\(waiting.uri): \(error.message)") }
            }
        }
        return changed
    }

    /// A client of `uid` names a server with credentials: a destination of that server and uid
    /// (the primary, for the daemon's own uid) whose credentials the server refuses takes them.
    /// Returns its key, or nil when none waits for credentials.
    private func rotate(_ destination: MLflowDestination, uid: UInt32, key: DestinationKey) -> DestinationKey? {
        if uid == getuid(), primary.serverURL == destination.baseURL, primary.needsCredentials != nil {
            primary.useCredentials(destination.credentials)
            return .primary
        }
        let candidates = others.withLock { Array($0) }
        let owned = owners.withLock { $0 }
        guard let (found, uploader) = candidates.first(where: { $0.value.serverURL == destination.baseURL && $0.value.needsCredentials != nil && owned[$0.key] == uid }) else {
            return nil
        }
        uploader.useCredentials(destination.credentials)
        // Both keys name it now: runs that hold the old one, and clients that bring the new credentials.
        others.withLock { $0[key] = uploader }
        owners.withLock { $0[key] = uid }
        return found
    }

    /// The uploader of a sink, with its dead-letter file (when the daemon keeps them).
    private static func uploader(sink: any RecordSink, journal: Journal, flushInterval: Double, settings: Settings, registry: RunRegistry) -> Uploader {
        let deadLetters = settings.deadLetterRoot.flatMap { try? DeadLetterFile(directory: $0, destination: sink.serverURL ?? sink.destination) }
        return Uploader(sink: sink, bounds: settings.bounds, flushInterval: flushInterval, journal: journal, deadLetters: deadLetters, registry: registry)
    }

    /// Opens (or creates) a journal directory for a destination.
    private static func openJournal(at directory: String?, identity: JournalIdentity, sink: any RecordSink, settings: Settings) throws(ProtocolError) -> (Journal, Journal.Recovery) {
        let dir = directory ?? settings.journalRoot + "/" + RunIDs.newRunID().prefix(16)
        do {
            try Directories.create(dir, mode: 0o700)
            if directory == nil {
                var writer = JSONWriter()
                writer.write(.object(identity.json))
                let bytes = writer.bytes
                guard FileManager.default.createFile(atPath: dir + "/destination", contents: Data(bytes), attributes: [.posixPermissions: 0o600]) else {
                    throw JournalError.io("cannot write \(dir)/destination")
                }
            }
            return try Journal.open(directory: dir, options: settings.journalOptions, replayBytes: settings.bounds.memoryBytes)
        } catch {
            throw ProtocolError(.internalError, "Cannot open the journal in \(dir): \(error). Check that the state directory is writable and not full.")
        }
    }

    /// Replays a journal into its uploader and the registry.
    private func restore(_ recovery: Journal.Recovery, into uploader: Uploader, key: DestinationKey) {
        let unsettled = recovery.state.unsettled
        let onDisk = recovery.state.leftOnDisk?.count ?? 0
        uploader.replay(recovery)
        var running: [String] = []
        // A sync's runs are not clients' runs: nothing to reattach or end (the next sync resumes them).
        for var entry in recovery.state.runs.values where RecordOrigin(handle: entry.handle) == .client {
            entry.destination = key
            registry.insert(entry)
            if entry.status == .running { running.append(entry.handle) }
        }
        report.withLock { r in
            r.journals += 1
            r.records += unsettled.count + onDisk
            r.spoolFiles.formUnion(recovery.state.unsettledSpoolFiles)
            r.runs += recovery.state.runs.count
            r.corruptRecords += recovery.corruptRecords
            r.truncatedBytes += recovery.truncatedBytes
            r.bytes += recovery.bytes
            r.seconds += recovery.seconds
        }
        onRestoredRuns(running)
        if !recovery.state.sessions.isEmpty { onRestoredSessions(Array(recovery.state.sessions.values)) }
    }

    /// Recovers the journal of a destination other than the daemon's own.
    private func recover(directory: String, identity: JournalIdentity) {
        do throws(ProtocolError) {
            let sink = try settings.sinks.sink(uri: identity.uri, credentials: identity.credentials == "daemon" ? settings.daemonCredentials : MLflowCredentials())
            let (journal, recovery) = try Self.openJournal(at: directory, identity: identity, sink: sink, settings: settings)
            if recovery.state.runs.isEmpty && recovery.state.unsettled.isEmpty && recovery.state.leftOnDisk == nil && recovery.state.sessions.isEmpty {
                journal.close()
                try? FileManager.default.removeItem(atPath: directory)  // nothing left for it
                return
            }
            if identity.credentials == "client" {
                let waiting = AwaitingCredentials(
                    uri: identity.uri, uid: identity.uid, pendingRecords: recovery.state.unsettled.count + (recovery.state.leftOnDisk?.count ?? 0),
                    runs: recovery.state.runs.count, journal: journal, recovery: recovery)
                awaiting.withLock { $0[identity.uri + "|" + String(identity.uid)] = waiting }
                report.withLock { $0.spoolFiles.formUnion(recovery.state.unsettledSpoolFiles) }
                return
            }
            let uploader = Self.uploader(sink: sink, journal: journal, flushInterval: settings.flushInterval, settings: settings, registry: registry)
            let key =
                MLflowDestination.isRemote(identity.uri)
                ? Self.key(MLflowDestination(trackingURI: identity.uri, credentials: identity.credentials == "daemon" ? settings.daemonCredentials : MLflowCredentials()))
                : DestinationKey(raw: identity.uri)
            others.withLock { $0[key] = uploader }
            owners.withLock { $0[key] = identity.uid }
            uploader.start()
            restore(recovery, into: uploader, key: key)
        } catch {
            report.withLock { $0.errors.append("\(directory): \(error.message)") }
        }
    }

    /// The uploader of a destination.
    public func uploader(_ key: DestinationKey) -> Uploader {
        key.isPrimary ? primary : others.withLock { $0[key] } ?? primary
    }

    /// Resolves what a client's `hello` names: the daemon's own destination, or another one
    /// (created now if new). A client of another uid may not point the daemon at a local path.
    public func resolve(trackingURI: String?, credentials: MLflowCredentials, peerUID: UInt32) throws(ProtocolError) -> DestinationKey {
        guard let uri = trackingURI, !uri.isEmpty, !uri.hasPrefix("armoryd:") else { return .primary }
        if MLflowDestination.isRemote(uri) {
            let destination = MLflowDestination(trackingURI: uri, credentials: credentials, tls: settings.tls)
            let key = Self.key(destination)
            if key == primaryKey || (credentials.isEmpty && Self.baseKey(destination) == primaryKey.map { String($0.raw.prefix { $0 != "|" }) }) {
                return .primary
            }
            if others.withLock({ $0[key] }) == nil, !credentials.isEmpty, let rotated = rotate(destination, uid: peerUID, key: key) {
                return rotated
            }
            let identity = JournalIdentity(uri: destination.baseURL, credentials: credentials.isEmpty ? "none" : "client", uid: peerUID)
            try create(key, identity: identity) { () throws(ProtocolError) in try settings.sinks.server(destination) }
            return key
        }
        if uri.hasPrefix("file:") || uri.hasPrefix("/") {
            guard peerUID == getuid() else { return .primary }  // another user's path: the daemon's own store instead
            var path = uri.hasPrefix("file://") ? String(uri.dropFirst(7)) : (uri.hasPrefix("file:") ? String(uri.dropFirst(5)) : uri)
            path = path.removingPercentEncoding ?? path
            if primary.destination == "file://" + path { return .primary }
            let key = DestinationKey(raw: "file://" + path)
            try create(key, identity: JournalIdentity(uri: key.raw, credentials: "none", uid: peerUID)) { () throws(ProtocolError) in try settings.sinks.sink(uri: key.raw, credentials: MLflowCredentials()) }
            return key
        }
        throw ProtocolError(.invalidValue, "Unsupported MLFLOW_TRACKING_URI '\(MLflowDestination.stripUserInfo(uri))': use http(s)://… for an MLflow server, a file:///… store, or armoryd: for the daemon's own destination.")
    }

    private func create(_ key: DestinationKey, identity: JournalIdentity, _ makeSink: () throws(ProtocolError) -> any RecordSink) throws(ProtocolError) {
        if others.withLock({ $0[key] }) != nil { return }
        try checkShare(of: identity.uid, adding: identity.uri)
        let sink = try makeSink()
        // A journal left by a previous life for this server and user resumes with these credentials.
        let waiting = identity.credentials == "client" ? awaiting.withLock { $0.removeValue(forKey: identity.uri + "|" + String(identity.uid)) } : nil
        let journal: Journal
        if let waiting {
            journal = waiting.journal
        } else {
            journal = try Self.openJournal(at: nil, identity: identity, sink: sink, settings: settings).0
        }
        let uploader = Self.uploader(sink: sink, journal: journal, flushInterval: settings.flushInterval, settings: settings, registry: registry)
        let inserted = others.withLock { all -> Bool in
            if all[key] != nil { return false }
            all[key] = uploader
            return true
        }
        guard inserted else {
            journal.close()
            return
        }
        owners.withLock { $0[key] = identity.uid }
        uploader.start()
        if let waiting { restore(waiting.recovery, into: uploader, key: key) }
    }

    /// One uid may name at most `maxDestinationsPerUser` destinations of its own (each has a
    /// journal of its own on the daemon's disk); the daemon's own user is not limited.
    private func checkShare(of uid: UInt32, adding uri: String) throws(ProtocolError) {
        guard uid != getuid() else { return }
        let current = others.withLock { map in owners.withLock { owned in Set(map.filter { owned[$0.key] == uid }.map { ObjectIdentifier($0.value) }) } }
        guard current.count >= settings.maxDestinationsPerUser else { return }
        let names = all.filter { current.contains(ObjectIdentifier($0)) }.map { $0.serverURL ?? $0.destination }
        throw ProtocolError(
            .tooManyDestinations,
            "uid \(uid) already writes to \(current.count) destinations of its own (\(names.joined(separator: ", "))); armoryd allows \(settings.maxDestinationsPerUser) per user (--max-destinations-per-user). Use one of them for \(MLflowDestination.stripUserInfo(uri)), or the daemon's own destination (unset MLFLOW_TRACKING_URI)."
        )
    }

    /// Every uploader, the primary first.
    public var all: [Uploader] {
        var seen: Set<ObjectIdentifier> = [ObjectIdentifier(primary)]
        // A destination whose credentials a client rotated is named by two keys: listed once.
        return [primary] + others.withLock { map in map.keys.sorted { $0.raw < $1.raw }.compactMap { map[$0] } }.filter { seen.insert(ObjectIdentifier($0)).inserted }
    }

    /// The uid a destination other than the daemon's own writes for (`nil`: the daemon's own,
    /// or one it recovered for itself).
    public func owner(of uploader: Uploader) -> UInt32? {
        guard uploader !== primary else { return nil }
        let keys = others.withLock { $0.filter { $0.value === uploader }.map(\.key) }
        let owned = owners.withLock { $0 }
        return keys.compactMap { owned[$0] }.first
    }

    /// Journals waiting for a client's credentials.
    public var awaitingCredentials: [AwaitingCredentials] {
        awaiting.withLock { $0.values.sorted { $0.uri < $1.uri } }
    }

    public var recoveryReport: RecoveryReport { report.withLock { $0 } }

    /// Drains every uploader within `timeout` seconds; returns the records left (journaled).
    public func shutdown(timeout: Double) async -> Int {
        var left = 0
        for uploader in all { left += await uploader.shutdown(timeout: timeout) }
        for waiting in awaiting.withLock({ Array($0.values) }) { waiting.journal.close() }
        return left
    }

    /// A destination's identity: its URL and who it writes as (a hash, never the secret).
    static func key(_ d: MLflowDestination) -> DestinationKey {
        var hasher = Hasher()
        hasher.combine(d.credentials.password)
        hasher.combine(d.credentials.token)
        return DestinationKey(raw: baseKey(d) + "|" + (d.credentials.username ?? "") + "|" + String(hasher.finalize()))
    }

    static func baseKey(_ d: MLflowDestination) -> String { d.baseURL }
}
