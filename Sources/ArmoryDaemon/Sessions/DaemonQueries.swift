import ArmoryProtocol
import Foundation
import MLflow

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

extension DaemonServices {
    /// Answers a `DaemonQuery` of the client `peer`, whose session writes to `destination`.
    func answer(_ query: DaemonQuery, peer: PeerCredentials, destination: DestinationKey, hello: Hello?) throws(ProtocolError) -> JSONObject {
        switch query {
        case .status:
            return StatusReport.make(services: self, viewer: peer).json
        case .sync(let request):
            return ["job": .object(try startSync(request, peer: peer, destination: destination, hello: hello).status.json)]
        case .syncStatus:
            return ["jobs": .array(syncs.all.map { .object($0.status.json) })]
        case .deadLetters(let runID, let retry):
            return deadLetters(runID: runID, retry: retry, peer: peer)
        }
    }

    /// `armoryctl errors`: the dead letters of every destination (the caller's own, unless it is
    /// an admin: root, the daemon's user, or in the admin group), of one run when `runID` is given; `retry` queues them again.
    private func deadLetters(runID: String?, retry: Bool, peer: PeerCredentials) -> JSONObject {
        let everyone = isAdmin(peer)
        var listed: [DeadLetterLine] = []
        var files: [String] = []
        for uploader in destinations.all {
            guard let file = uploader.deadLetters, !files.contains(file.path) else { continue }
            files.append(file.path)
            let selected = file.lines.filter { (everyone || $0.uid == peer.uid) && (runID == nil || $0.runID == runID) }
            if retry { uploader.retry(selected) }
            listed += selected
        }
        var reply: JSONObject = ["dead_letters": .array(listed.map { .object($0.json) }), "files": .array(files.map { .string($0) })]
        if retry { reply["requeued"] = .int(Int64(listed.count)) }
        return reply
    }

    /// Starts copying a local store into the session's destination (its hello's tracking URI
    /// and credentials). Another user's path is not read for them: only the daemon's own
    /// store, or a path of a client running as the daemon's user (or root).
    private func startSync(_ request: SyncRequest, peer: PeerCredentials, destination: DestinationKey, hello: Hello?) throws(ProtocolError) -> SyncJob {
        let uploader = destinations.uploader(destination)
        if destination.isPrimary, let uri = hello?.trackingURI, !uri.isEmpty, !uri.hasPrefix("armoryd:"), !MLflowDestination.isRemote(uri), peer.uid != getuid() {
            throw ProtocolError(.permissionDenied, "armoryd runs as uid \(getuid()) and does not write to \(uri) for uid \(peer.uid): sync into an MLflow server, or into your own store with your own daemon (a user unit).")
        }
        guard uploader.destination.hasPrefix("http") || uploader.destination.hasPrefix("file://") else {
            throw ProtocolError(.invalidValue, "sync needs an MLflow server (--to http(s)://…) or a local store (--to PATH) as its destination; this connection's destination is \(uploader.destination).")
        }
        let source: String
        if let from = request.from {
            guard peer.uid == getuid() || peer.uid == 0 else {
                throw ProtocolError(.permissionDenied, "armoryd runs as uid \(getuid()) and does not read \(from) for uid \(peer.uid): sync your own store with your own daemon (a user unit), or ask an admin.")
            }
            source = from
        } else {
            guard let own = syncs.localStore else {
                throw ProtocolError(.invalidValue, "This daemon has no local store (it writes to \(self.uploader.destination)): name one with --from PATH.")
            }
            source = own
        }
        do throws(FileStoreError) { _ = try FileStoreReader(root: source) } catch { throw ProtocolError(.invalidValue, error.description) }
        if uploader.destination.hasPrefix("file://"), Self.samePath(String(uploader.destination.dropFirst(7)), source) {
            throw ProtocolError(.invalidValue, "\(source) is both the source and the destination: name another store with --from or --to.")
        }
        return syncs.start(request, source: source, uploader: uploader, spoolDirectory: spoolDirectory, logger: logger)
    }

    private static func samePath(_ a: String, _ b: String) -> Bool {
        URL(fileURLWithPath: a).resolvingSymlinksInPath().standardizedFileURL == URL(fileURLWithPath: b).resolvingSymlinksInPath().standardizedFileURL
    }
}
