import ArmoryDaemon
import ArmoryProtocol
import Foundation
import Logging
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// A real armoryd (the library, in this process) on a socket in a temporary directory.
public final class TestDaemon: Sendable {
    public let directory: String
    public let socketPath: String
    private let group: ServiceGroup
    private let task: Task<Void, Error>

    /// `directory`: a previous daemon's (a restart), else a new one.
    public init(orphanGrace: Double = 60, directory: String? = nil) async throws {
        let directory = directory ?? "/tmp/armoryd-test-" + String(UUID().uuidString.prefix(8))
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        self.directory = directory
        socketPath = directory + "/d.sock"
        var config = DaemonConfiguration(socketPath: socketPath, storeRoot: directory + "/mlruns", stateDirectory: directory + "/state")
        config.orphanGraceSeconds = orphanGrace
        config.eventLoopThreads = 2
        var logger = Logger(label: "test-armoryd")
        logger.logLevel = .warning
        let ready = AsyncStream<String>.makeStream()
        let daemon = Daemon(configuration: config, logger: logger) { path in
            ready.continuation.yield(path)
            ready.continuation.finish()
        }
        let group = ServiceGroup(services: [daemon], gracefulShutdownSignals: [], cancellationSignals: [], logger: logger)
        self.group = group
        task = Task { try await group.run() }
        var iterator = ready.stream.makeAsyncIterator()
        guard await iterator.next() != nil else {
            _ = try await task.value
            throw ProtocolError(.internalError, "daemon did not become ready")
        }
    }

    public var storeRoot: String { directory + "/mlruns" }

    /// Stops the daemon; `keepState` leaves its directory for a restart.
    public func stop(keepState: Bool = false) async throws {
        await group.triggerGracefulShutdown()
        try await task.value
        if !keepState { try? FileManager.default.removeItem(atPath: directory) }
    }

    /// Files under the store whose path ends with `suffix`.
    public func files(endingWith suffix: String) -> [String] {
        let walker = FileManager.default.enumerator(atPath: storeRoot)
        var found: [String] = []
        while let path = walker?.nextObject() as? String {
            if path.hasSuffix(suffix) { found.append(storeRoot + "/" + path) }
        }
        return found
    }
}

/// A raw socket client for sending arbitrary bytes and reading what the daemon answers.
public final class RawClient {
    public let fd: Int32

    public init(path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let bytes = Array(path.utf8)
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard result == 0 else { throw ProtocolError(.internalError, "connect failed: \(errno)") }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(fd) }

    public func write(_ bytes: [UInt8]) {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + offset, bytes.count - offset) }
            if n <= 0 { return }
            offset += n
        }
    }

    public func send(_ json: String) { write(Frame.encode(Array(json.utf8))) }

    public func hello(seq: Int = 1) throws {
        send(#"{"op":"hello","seq":\#(seq),"protocol":1,"client":"raw","program":"raw"}"#)
        _ = try next { if case .reply = $0 { true } else { false } }
    }

    private var decoder = FrameDecoder()

    /// Reads until a message matching `predicate` arrives; nil when the daemon closed the connection.
    public func next(_ predicate: (DaemonMessage) -> Bool = { _ in true }) throws -> DaemonMessage? {
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            while case .frame(let payload) = decoder.next() {
                let message = try DaemonMessage.decode(payload: payload)
                if predicate(message) { return message }
            }
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n <= 0 { return nil }
            decoder.feed(buffer[0..<n])
        }
    }

    public func nextError() throws -> ProtocolError? {
        guard case .error(let e)? = try next({ if case .error = $0 { true } else { false } }) else { return nil }
        return e
    }
}
