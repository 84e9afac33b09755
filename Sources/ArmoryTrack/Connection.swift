#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import ArmoryProtocol
import Foundation

/// What a client call can fail with.
public enum ArmoryError: Error, CustomStringConvertible, Equatable {
    /// No daemon answered on any socket path tried.
    case notRunning(String)
    /// The connection to the daemon broke.
    case disconnected(String)
    /// The daemon refused a request.
    case rejected(ProtocolError)
    /// Fire-and-forget ops the daemon refused since the last sync point.
    case deferred([ProtocolError])
    /// No answer within the bound.
    case timedOut(String)
    /// A reply the client did not understand.
    case protocolViolation(String)

    public var description: String {
        switch self {
        case .notRunning(let message), .disconnected(let message), .timedOut(let message), .protocolViolation(let message):
            return message
        case .rejected(let error):
            return error.description
        case .deferred(let errors):
            let shown = errors.prefix(10).map { "  - \($0.description)" }.joined(separator: "\n")
            let more = errors.count > 10 ? "\n  … and \(errors.count - 10) more" : ""
            return "armoryd refused \(errors.count) earlier operation(s):\n\(shown)\(more)"
        }
    }
}

/// One connection to armoryd: frames out through a writer thread (a call only appends to a
/// buffer), acks, errors and replies in through a reader thread.
///
/// Thread-safe. Fire-and-forget ops never wait for the daemon; requests wait for their reply.
public final class Connection: @unchecked Sendable {
    public let socketPath: String
    public private(set) var helloReply: HelloReply!

    private let fd: Int32
    private let condition = NSCondition()
    // Everything below is guarded by `condition`.
    private var output = JSONWriter(capacity: 64 * 1024)
    private var nextSeq: UInt64 = 1
    private var writerIdle = false
    private var closedReason: String?
    private var replies: [UInt64: Result<JSONObject, ProtocolError>] = [:]
    private var awaited: Set<UInt64> = []
    private var deferredErrors: [ProtocolError] = []
    private var ackedUpTo: UInt64 = 0
    private var lastSent: UInt64 = 0
    private let maxBufferedBytes = 8 << 20

    /// Connects to `socketPath`, or discovers the daemon (DESIGN.md's order), and says hello.
    public init(socketPath: String? = nil, client: String = "ArmoryTrack", program: String = CommandLine.arguments.first ?? "",
                environment: [String: String] = ProcessInfo.processInfo.environment) throws(ArmoryError) {
        let candidates = socketPath.map { [$0] } ?? SocketDiscovery.clientCandidates(environment: environment) { FileManager.default.fileExists(atPath: $0) }
        var lastReason = "no candidate path"
        var connected: (Int32, String)?
        for path in candidates {
            switch Self.connect(path) {
            case .success(let fd): connected = (fd, path)
            case .failure(let reason): lastReason = "\(path): \(reason)"
            }
            if connected != nil { break }
        }
        guard let (fd, path) = connected else {
            throw .notRunning(SocketDiscovery.notRunningMessage(tried: socketPath.map { [$0] } ?? SocketDiscovery.describedCandidates(environment: environment), reason: lastReason))
        }
        self.fd = fd
        self.socketPath = path
        startThreads()
        let absoluteProgram = program.hasPrefix("/") || program.isEmpty ? program : FileManager.default.currentDirectoryPath + "/" + program
        // The process's own MLflow destination and credentials (`ARMORY_TRACKING_URI`, else
        // `MLFLOW_TRACKING_URI`): the daemon writes this process's runs there, keeping them in
        // memory only; none, or `armoryd:`, means the daemon's own.
        let hello = Hello(client: client, clientVersion: ArmoryTrackVersion.current, program: absoluteProgram,
                          trackingURI: [environment["ARMORY_TRACKING_URI"], environment["MLFLOW_TRACKING_URI"]].compactMap { $0 }.first { !$0.isEmpty },
                          credentials: MLflowCredentials.resolve(environment: environment))
        let body = try request(.hello(hello), timeout: 10)
        guard let reply = HelloReply(json: body) else { throw .protocolViolation("armoryd sent an unreadable hello reply.") }
        helloReply = reply
    }

    deinit {
        shutdown(fd, Int32(SHUT_RDWR))
        close(fd)
    }

    private static func connect(_ path: String) -> Result<Int32, ConnectFailure> {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return .failure(ConnectFailure(String(cString: strerror(errno)))) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            close(fd)
            return .failure(ConnectFailure("path too long for a Unix socket"))
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard result == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            return .failure(ConnectFailure(reason))
        }
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, socklen_t(MemoryLayout<Int32>.size))
        return .success(fd)
    }

    private struct ConnectFailure: Error, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }

    private func startThreads() {
        let writer = Thread { [self] in writeLoop() }
        writer.name = "armory-writer"
        writer.start()
        let reader = Thread { [self] in readLoop() }
        reader.name = "armory-reader"
        reader.start()
    }

    // MARK: Sending

    /// Appends a fire-and-forget frame built by `encode` (which writes the JSON payload) and
    /// returns its seq. Never waits for the daemon, only for buffer space past 8 MiB.
    @discardableResult
    func send(awaitingReply: Bool = false, _ encode: (inout JSONWriter, UInt64) -> Void) -> UInt64 {
        condition.lock()
        defer { condition.unlock() }
        while output.bytes.count > maxBufferedBytes && closedReason == nil { condition.wait() }
        let seq = nextSeq
        nextSeq += 1
        if awaitingReply { awaited.insert(seq) }
        let start = output.bytes.count
        output.bytes.append(contentsOf: [0, 0, 0, 0])
        encode(&output, seq)
        Frame.patchHeader(length: output.bytes.count - start - 4, in: &output.bytes, at: start)
        if writerIdle { condition.broadcast() }
        return seq
    }

    /// Sends an op without waiting.
    @discardableResult
    public func send(_ op: ClientOp) -> UInt64 {
        send { writer, seq in writer.write(ClientFrame(seq: seq, op: op).json) }
    }

    /// Sends a request and waits for its reply (or error) at most `timeout` seconds.
    public func request(_ op: ClientOp, timeout: Double = 30) throws(ArmoryError) -> JSONObject {
        let seq = send(awaitingReply: true) { writer, seq in writer.write(ClientFrame(seq: seq, op: op).json) }
        return try waitForReply(seq: seq, timeout: timeout, what: op.name)
    }

    /// The daemon's status (what `armoryctl status --json` prints).
    public func status(timeout: Double = 10) throws(ArmoryError) -> JSONObject {
        try request(.status, timeout: timeout)
    }

    private func waitForReply(seq: UInt64, timeout: Double, what: String) throws(ArmoryError) -> JSONObject {
        condition.lock()
        defer { condition.unlock() }
        let deadline = Date(timeIntervalSinceNow: timeout)
        while replies[seq] == nil {
            if let reason = closedReason {
                awaited.remove(seq)
                throw .disconnected(reason)
            }
            if !condition.wait(until: deadline) && replies[seq] == nil {
                awaited.remove(seq)
                throw .timedOut("armoryd did not answer '\(what)' within \(timeout) s (socket \(socketPath)).")
            }
        }
        awaited.remove(seq)
        switch replies.removeValue(forKey: seq)! {
        case .success(let body): return body
        case .failure(let error): throw .rejected(error)
        }
    }

    /// Errors of fire-and-forget ops received so far (cleared).
    public func takeDeferredErrors() -> [ProtocolError] {
        condition.lock()
        defer { condition.unlock() }
        let errors = deferredErrors
        deferredErrors.removeAll()
        return errors
    }

    /// Throws the errors of earlier fire-and-forget ops, if any.
    public func raiseDeferredErrors() throws(ArmoryError) {
        let errors = takeDeferredErrors()
        if !errors.isEmpty { throw .deferred(errors) }
    }

    /// The highest seq the daemon acknowledged.
    public var acknowledged: UInt64 {
        condition.lock()
        defer { condition.unlock() }
        return ackedUpTo
    }

    // MARK: Threads

    private func writeLoop() {
        var pending = JSONWriter(capacity: 64 * 1024)
        while true {
            condition.lock()
            while output.bytes.isEmpty && closedReason == nil {
                writerIdle = true
                condition.wait()
            }
            writerIdle = false
            if closedReason != nil {
                condition.unlock()
                return
            }
            swap(&pending, &output)
            condition.broadcast()  // wake senders waiting for buffer space
            condition.unlock()

            var offset = 0
            let count = pending.bytes.count
            while offset < count {
                let n = pending.bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, count - offset) }
                if n < 0 {
                    if errno == EINTR { continue }
                    markClosed("writing to armoryd failed: \(String(cString: strerror(errno)))")
                    return
                }
                offset += n
            }
            pending.bytes.removeAll(keepingCapacity: true)
        }
    }

    private func readLoop() {
        var decoder = FrameDecoder()
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 {
                markClosed(n == 0 ? "armoryd closed the connection (socket \(socketPath))." : "reading from armoryd failed: \(String(cString: strerror(errno))).")
                return
            }
            decoder.feed(buffer[0..<n])
            while true {
                switch decoder.next() {
                case .needMoreData:
                    break
                case .tooLarge(let length):
                    markClosed("armoryd sent a frame of \(length) bytes, over the client's limit.")
                    return
                case .frame(let payload):
                    deliver(payload)
                    continue
                }
                break
            }
        }
    }

    private func deliver(_ payload: [UInt8]) {
        let message: DaemonMessage
        do { message = try DaemonMessage.decode(payload: payload) } catch {
            markClosed("armoryd sent an unreadable frame: \(error)")
            return
        }
        condition.lock()
        defer { condition.unlock() }
        switch message {
        case .ack(let upto):
            ackedUpTo = max(ackedUpTo, upto)
        case .reply(let seq, let body):
            replies[seq] = .success(body)
        case .error(let error):
            if let seq = error.seq, awaited.contains(seq) {
                replies[seq] = .failure(error)
            } else {
                deferredErrors.append(error)
            }
        }
        condition.broadcast()
    }

    private func markClosed(_ reason: String) {
        condition.lock()
        if closedReason == nil { closedReason = reason }
        condition.broadcast()
        condition.unlock()
    }

    /// Closes the connection (the daemon keeps everything it acknowledged).
    public func disconnect() {
        markClosed("the connection was closed by the client.")
        shutdown(fd, Int32(SHUT_RDWR))
    }
}

/// The version of this client library.
public enum ArmoryTrackVersion {
    public static let current = "0.1.0"
}
