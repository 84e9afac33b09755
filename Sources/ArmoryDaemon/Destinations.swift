#if canImport(Glibc)
import Glibc
#endif
import ArmoryProtocol
import Foundation
import MLflow
import Synchronization

/// Every destination the daemon writes to: its own (the primary uploader), and the MLflow servers
/// or stores that evaluations name in `hello` (their process's `MLFLOW_TRACKING_URI` and
/// credentials), each with an uploader of its own, created on first use and kept in memory only.
public final class Destinations: Sendable {
    /// How to make the uploader of a destination an evaluation names.
    public struct Settings: Sendable {
        public var highWater: Int
        public var uploadConcurrency: Int
        public var flushInterval: Double
        public var requestTimeout: Double
        /// TLS settings of the daemon (a client's certificate paths are its own files).
        public var tls: MLflowTLSSettings

        public init(highWater: Int = 200_000, uploadConcurrency: Int = 4, flushInterval: Double = 1, requestTimeout: Double = 30, tls: MLflowTLSSettings = .init()) {
            self.highWater = highWater
            self.uploadConcurrency = uploadConcurrency
            self.flushInterval = flushInterval
            self.requestTimeout = requestTimeout
            self.tls = tls
        }
    }

    public let primary: Uploader
    /// The primary destination's identity, so a client naming the same server uses it.
    private let primaryKey: String?
    private let settings: Settings
    private let others = Mutex<[String: Uploader]>([:])

    public init(primary: Uploader, primaryServer: MLflowDestination? = nil, settings: Settings = Settings()) {
        self.primary = primary
        self.primaryKey = primaryServer.map(Self.key)
        self.settings = settings
    }

    /// The uploader of a destination key (`nil`: the daemon's own).
    public func uploader(_ key: String?) -> Uploader {
        guard let key else { return primary }
        return others.withLock { $0[key] } ?? primary
    }

    /// Resolves what a client's `hello` names: `nil` for the daemon's own destination, else the
    /// key of a destination (created now if new). A client of another uid may not point the
    /// daemon at a local path.
    public func resolve(trackingURI: String?, credentials: MLflowCredentials, peerUID: UInt32) throws(ProtocolError) -> String? {
        guard let uri = trackingURI, !uri.isEmpty, !uri.hasPrefix("armoryd:") else { return nil }
        if MLflowDestination.isRemote(uri) {
            let destination = MLflowDestination(trackingURI: uri, credentials: credentials, tls: settings.tls)
            let key = Self.key(destination)
            if key == primaryKey || (credentials.isEmpty && Self.baseKey(destination) == primaryKey.map { String($0.prefix { $0 != "|" }) }) {
                return nil
            }
            try create(key) { () throws(ProtocolError) -> any RecordSink in
                try RESTSink(destination: destination, concurrency: settings.uploadConcurrency, requestTimeoutSeconds: settings.requestTimeout)
            }
            return key
        }
        if uri.hasPrefix("file:") || uri.hasPrefix("/") {
            guard peerUID == getuid() else { return nil }  // another user's path: the daemon's own store instead
            var path = uri.hasPrefix("file://") ? String(uri.dropFirst(7)) : (uri.hasPrefix("file:") ? String(uri.dropFirst(5)) : uri)
            path = path.removingPercentEncoding ?? path
            if primary.destination == "file://" + path { return nil }
            let key = "file://" + path
            try create(key) { () throws(ProtocolError) -> any RecordSink in try FileStoreSink(root: path) }
            return key
        }
        throw ProtocolError(.invalidValue, "Unsupported MLFLOW_TRACKING_URI '\(MLflowDestination.stripUserInfo(uri))': use http(s)://… for an MLflow server, a file:///… store, or armoryd: for the daemon's own destination.")
    }

    private func create(_ key: String, _ makeSink: () throws(ProtocolError) -> any RecordSink) throws(ProtocolError) {
        if others.withLock({ $0[key] }) != nil { return }
        let uploader = Uploader(sink: try makeSink(), highWater: settings.highWater, flushInterval: settings.flushInterval)
        let inserted = others.withLock { all -> Bool in
            if all[key] != nil { return false }
            all[key] = uploader
            return true
        }
        if inserted { uploader.start() }
    }

    /// Every uploader, the primary first.
    public var all: [Uploader] {
        [primary] + others.withLock { map in map.keys.sorted().compactMap { map[$0] } }
    }

    /// Drains every uploader within `timeout` seconds; returns the records left.
    public func shutdown(timeout: Double) async -> Int {
        var left = 0
        for uploader in all { left += await uploader.shutdown(timeout: timeout) }
        return left
    }

    /// A destination's identity: its URL and who it writes as (a hash, never the secret).
    static func key(_ d: MLflowDestination) -> String {
        var hasher = Hasher()
        hasher.combine(d.credentials.password)
        hasher.combine(d.credentials.token)
        return baseKey(d) + "|" + (d.credentials.username ?? "") + "|" + String(hasher.finalize())
    }

    static func baseKey(_ d: MLflowDestination) -> String { d.baseURL }
}
