import ArmoryProtocol
import Foundation

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#elseif canImport(Darwin)
    import Darwin
#endif

/// What a client call can fail with.
public enum ArmoryError: Error, CustomStringConvertible, Equatable {
    /// No daemon answered on any socket path tried.
    case notRunning(String)
    /// A daemon listens, but this user may not connect (not in the socket's group).
    case permissionDenied(String)
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
        case .notRunning(let message), .permissionDenied(let message), .disconnected(let message), .timedOut(let message), .protocolViolation(let message):
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
///
/// The session outlives the socket: every frame written is kept until the daemon acknowledges
/// it. When the connection breaks (a daemon restart, an upgrade, the watchdog), a reconnect
/// thread connects again for up to `ARMORY_RECONNECT_SECONDS` (default 300), resumes the
/// session and resends what the daemon does not hold; calls meanwhile go on (requests wait). At
/// most `ARMORY_RETAIN_BYTES` (default 64 MiB) are kept: past it, callers wait for acks.
///
/// No call waits without a bound: a full buffer waits at most `ARMORY_SEND_TIMEOUT` (default
/// 300 s) for the daemon to read (then the op is not sent and the next sync point says so), a
/// write to a daemon that does not read fails after as long (and the session is resumed), a
/// request waits its timeout. A frame over the daemon's limit is never sent: a request throws,
/// a fire-and-forget op's refusal is raised at the next sync point.
public final class Connection: @unchecked Sendable {
    public private(set) var socketPath: String
    public private(set) var helloReply: HelloReply!

    private var fd: Int32
    private let condition = NSCondition()
    /// Written frames kept until acked: (seq of the first and of the last frame in them, bytes), in order.
    private var retained: [(first: UInt64, last: UInt64, bytes: [UInt8])] = []
    /// The seq of the first frame in `output`.
    private var outputFirst: UInt64 = 0
    private var retainedBytes = 0
    /// Frames of requests still waiting for their reply (resent after a resume if the daemon
    /// held them but its reply was lost).
    private var requestFrames: [UInt64: [UInt8]] = [:]
    private var reconnecting = false
    private var hello: Hello!
    private let explicitPath: String?
    private let environment: [String: String]
    /// How long `hello` (and a resuming one) waits for the daemon's answer.
    private let connectTimeout: Double
    private let maxRetainedBytes: Int
    private let reconnectSeconds: Double
    private let sendTimeout: Double
    /// The daemon's frame limit (its hello reply's; the default until then). Guarded by `condition`.
    private var maxFrameBytes = ProtocolLimits.default.maxFrameBytes
    /// How many times the session was resumed on a new connection.
    public private(set) var resumes = 0
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

    /// Connects to `socketPath`, or discovers the daemon (docs/architecture.md, "Finding the daemon"), and says hello.
    /// `admin`: an admin tool (`armoryctl`), which fails fast (a broken connection is final, no
    /// session is resumed) and is not listed as a client.
    public init(
        socketPath: String? = nil, client: String = "ArmoryTrack", program: String = CommandLine.arguments.first ?? "",
        environment: [String: String] = ProcessInfo.processInfo.environment, admin: Bool = false
    ) throws(ArmoryError) {
        let candidates = socketPath.map { [$0] } ?? SocketDiscovery.clientCandidates(environment: environment) { FileManager.default.fileExists(atPath: $0) }
        var lastReason = "no candidate path"
        var connected: (Int32, String)?
        let sendTimeout = environment["ARMORY_SEND_TIMEOUT"].flatMap(Double.init) ?? 300
        // How long hello's answer may take: a daemon on a saturated host answers late, not never.
        connectTimeout = environment["ARMORY_CONNECT_TIMEOUT"].flatMap(Double.init) ?? 30
        for path in candidates {
            switch Self.connect(path, sendTimeout: sendTimeout) {
            case .success(let fd): connected = (fd, path)
            case .failure(let failure):
                if failure.code == EACCES { throw .permissionDenied(Self.permissionMessage(path)) }
                lastReason = "\(path): \(failure)"
            }
            if connected != nil { break }
        }
        guard let (fd, path) = connected else {
            throw .notRunning(SocketDiscovery.notRunningMessage(tried: socketPath.map { [$0] } ?? SocketDiscovery.describedCandidates(environment: environment), reason: lastReason))
        }
        self.fd = fd
        self.socketPath = path
        self.explicitPath = socketPath
        self.environment = environment
        self.maxRetainedBytes = environment["ARMORY_RETAIN_BYTES"].flatMap(Int.init) ?? 64 << 20
        self.sendTimeout = sendTimeout
        self.reconnectSeconds = !admin ? environment["ARMORY_RECONNECT_SECONDS"].flatMap(Double.init) ?? 300 : 0
        let writer = Thread { [self] in writeLoop() }
        writer.name = "armory-writer"
        writer.start()
        startReader(fd: fd, leftover: [])
        let absoluteProgram = program.hasPrefix("/") || program.isEmpty ? program : FileManager.default.currentDirectoryPath + "/" + program
        // The process's own MLflow destination and credentials (`ARMORY_TRACKING_URI`, else
        // `MLFLOW_TRACKING_URI`): the daemon writes this process's runs there, keeping them in
        // memory only; none, or `armoryd:`, means the daemon's own.
        var hello = Hello(
            client: client, clientVersion: ArmoryTrackVersion.current, program: absoluteProgram,
            trackingURI: [environment["ARMORY_TRACKING_URI"], environment["MLFLOW_TRACKING_URI"]].compactMap { $0 }.first { !$0.isEmpty },
            credentials: MLflowCredentials.resolve(environment: environment))
        hello.admin = admin
        self.hello = hello
        let body = try request(.hello(hello), timeout: connectTimeout)
        guard let reply = HelloReply(json: body) else { throw .protocolViolation("armoryd sent an unreadable hello reply.") }
        helloReply = reply
        condition.lock()
        maxFrameBytes = reply.limits.maxFrameBytes
        condition.unlock()
    }

    /// The session this connection carries (what a resume names).
    public var session: String? { helloReply?.session }

    deinit {
        shutdown(fd, Int32(SHUT_RDWR))
        close(fd)
    }

    private static func connect(_ path: String, sendTimeout: Double) -> Result<Int32, ConnectFailure> {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)  // not inherited by programs it runs
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
            let code = errno
            close(fd)
            return .failure(ConnectFailure(String(cString: strerror(code)), code: code))
        }
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, socklen_t(MemoryLayout<Int32>.size))
        // A write the daemon does not take within the bound fails (the session is then resumed).
        var bound = timeval(tv_sec: Int(sendTimeout), tv_usec: Int((sendTimeout - sendTimeout.rounded(.down)) * 1e6))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &bound, socklen_t(MemoryLayout<timeval>.size))
        return .success(fd)
    }

    private struct ConnectFailure: Error, CustomStringConvertible {
        var description: String
        var code: Int32 = 0
        init(_ description: String, code: Int32 = 0) {
            self.description = description
            self.code = code
        }
    }

    /// Why this user may not connect to `path`, and what to do: the socket's group.
    static func permissionMessage(_ path: String) -> String {
        var info = stat()
        let group = stat(path, &info) == 0 ? getgrgid(info.st_gid).map { String(cString: $0.pointee.gr_name) } ?? "\(info.st_gid)" : "armory"
        return "Permission denied on \(path): armoryd's socket is for members of group '\(group)'. Ask an admin to add you "
            + "(`sudo usermod -aG \(group) $USER`), then log in again (or run `newgrp \(group)`)."
    }

    private func startReader(fd: Int32, leftover: [UInt8]) {
        let reader = Thread { [self] in readLoop(fd: fd, leftover: leftover) }
        reader.name = "armory-reader"
        reader.start()
    }

    // MARK: Sending

    /// Appends a frame of op `name` built by `encode` (which writes the JSON payload) and returns
    /// its seq. Never waits for the daemon, only for buffer space past 8 MiB (at most
    /// `ARMORY_SEND_TIMEOUT`, longer while the daemon is away: its reconnect budget too). Not
    /// sent (an error): no room in time, or a frame over the daemon's limit.
    func append(_ name: String, awaitingReply: Bool = false, _ encode: (inout JSONWriter, UInt64) -> Void) -> Result<UInt64, ProtocolError> {
        condition.lock()
        defer { condition.unlock() }
        // While the daemon is away the buffer may grow to the retention bound: calls keep their
        // usual cost through an outage until then.
        var deadline: Date?  // set once a wait begins: the common path reads no clock
        var extended = false
        while closedReason == nil && !output.bytes.isEmpty
            && ((output.bytes.count > maxBufferedBytes && !reconnecting) || retainedBytes + output.bytes.count > maxRetainedBytes)
        {
            var bound = deadline ?? Date(timeIntervalSinceNow: sendTimeout)
            if reconnecting && !extended {
                bound += reconnectSeconds
                extended = true
            }
            deadline = bound
            if !condition.wait(until: bound) && Date() >= bound {
                return .failure(ProtocolError(.unreachable, "Not sent: armoryd has not read from this process for ARMORY_SEND_TIMEOUT=\(sendTimeout) s (socket \(socketPath); `armoryctl status` shows why); \(undelivered) yet.", op: name))
            }
        }
        let seq = nextSeq
        let start = output.bytes.count
        output.bytes.append(contentsOf: [0, 0, 0, 0])
        encode(&output, seq)
        let length = output.bytes.count - start - 4
        let limit = maxFrameBytes
        guard length <= limit else {
            output.bytes.removeSubrange(start...)
            return .failure(
                ProtocolError(
                    .frameTooLarge, "Not sent: '\(name)' would be a frame of \(length) bytes; armoryd accepts at most \(limit) (max_frame_bytes). Log large values as artifacts (logText, logBytes, logArtifact), which are sent in chunks.", op: name))
        }
        nextSeq += 1
        if start == 0 { outputFirst = seq }
        Frame.patchHeader(length: length, in: &output.bytes, at: start)
        if awaitingReply {
            awaited.insert(seq)
            requestFrames[seq] = Array(output.bytes[start...])
        }
        if writerIdle { condition.broadcast() }
        return .success(seq)
    }

    /// Appends a fire-and-forget frame; a refusal before sending is raised at the next sync point.
    func send(_ name: String, _ encode: (inout JSONWriter, UInt64) -> Void) {
        if case .failure(let error) = append(name, encode) { refuse(error) }
    }

    /// Sends an op without waiting (a refusal is raised at the next sync point).
    public func send(_ op: ClientOp) {
        send(op.name) { writer, seq in writer.write(ClientFrame(seq: seq, op: op).json) }
    }

    /// Records a refusal found before sending, raised at the next sync point like the daemon's.
    public func refuse(_ error: ProtocolError) {
        condition.lock()
        deferredErrors.append(error)
        condition.unlock()
    }

    /// Sends a request and waits for its reply (or error) at most `timeout` seconds; while the
    /// daemon is away, within the reconnect budget instead, unless `waitsOutOutage` is false (the
    /// flush at exit).
    public func request(_ op: ClientOp, timeout: Double = 30, waitsOutOutage: Bool = true) throws(ArmoryError) -> JSONObject {
        let seq: UInt64
        switch append(op.name, awaitingReply: true, { writer, seq in writer.write(ClientFrame(seq: seq, op: op).json) }) {
        case .success(let appended): seq = appended
        case .failure(let error): throw .rejected(error)
        }
        return try waitForReply(seq: seq, timeout: timeout, what: op.name, waitsOutOutage: waitsOutOutage)
    }

    /// The daemon's status (what `armoryctl status --json` prints).
    public func status(timeout: Double = 10) throws(ArmoryError) -> JSONObject {
        try request(.status, timeout: timeout)
    }

    private func waitForReply(seq: UInt64, timeout: Double, what: String, waitsOutOutage: Bool) throws(ArmoryError) -> JSONObject {
        condition.lock()
        defer { condition.unlock() }
        let deadline = Date(timeIntervalSinceNow: timeout)
        defer {
            awaited.remove(seq)
            requestFrames[seq] = nil
        }
        while replies[seq] == nil {
            if let reason = closedReason { throw .disconnected(reason) }
            // While the daemon is away, a request waits within the reconnect budget instead.
            let outage = reconnecting && waitsOutOutage
            if !condition.wait(until: outage ? Date(timeIntervalSinceNow: 0.5) : deadline) && replies[seq] == nil && !outage
                && Date() >= deadline
            {
                if reconnecting {
                    throw .timedOut("armoryd is away (its connection broke) and was not back within \(timeout) s: \(undelivered) yet.")
                }
                throw .timedOut("armoryd did not answer '\(what)' within \(timeout) s (socket \(socketPath)).")
            }
        }
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
            while (output.bytes.isEmpty || reconnecting) && closedReason == nil {
                writerIdle = true
                condition.wait()
            }
            writerIdle = false
            if closedReason != nil {
                condition.unlock()
                return
            }
            swap(&pending, &output)
            retained.append((outputFirst, nextSeq - 1, pending.bytes))
            retainedBytes += pending.bytes.count
            let fd = fd
            condition.broadcast()  // wake senders waiting for buffer space
            condition.unlock()

            if let failure = Self.writeAll(fd, pending.bytes) {
                lost(fd: fd, reason: "writing to armoryd failed: \(failure)")
            }
            pending.bytes.removeAll(keepingCapacity: true)
        }
    }

    /// Writes everything; the failure's description, if any. `MSG_NOSIGNAL`: a daemon that went
    /// away is an error to handle (a resume), not a SIGPIPE that kills the evaluation.
    private static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> String? {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + offset, bytes.count - offset, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                return String(cString: strerror(errno))
            }
            offset += n
        }
        return nil
    }

    private func readLoop(fd: Int32, leftover: [UInt8]) {
        var decoder = FrameDecoder()
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        var first = leftover
        while true {
            if first.isEmpty {
                let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 {
                    lost(fd: fd, reason: n == 0 ? "armoryd closed the connection (socket \(socketPath))." : "reading from armoryd failed: \(String(cString: strerror(errno))).")
                    return
                }
                decoder.feed(buffer[0..<n])
            } else {
                decoder.feed(first[...])
                first = []
            }
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
            let released = retained.prefix { $0.last <= ackedUpTo }
            retainedBytes -= released.reduce(0) { $0 + $1.bytes.count }
            retained.removeFirst(released.count)
        case .reply(let seq, let body):
            if awaited.contains(seq) { replies[seq] = .success(body) }  // a re-sent request may be answered twice
        case .error(let error):
            if let seq = error.seq, awaited.contains(seq) {
                replies[seq] = .failure(error)
            } else if error.seq != nil, let op = error.op, ClientOp.requestNames.contains(op) {
                break  // a re-sent request answered again: its answer was already taken
            } else {
                deferredErrors.append(error)
            }
            if error.code == .frameTooLarge || error.code == .unsupportedProtocol { fatal = error.description }
        }
        condition.broadcast()
    }

    /// An error after which the daemon closes the connection: resending would only repeat it.
    private var fatal: String?

    // MARK: Resuming

    /// The socket `fd` broke: resume the session on a new one (or close, with no session yet).
    private func lost(fd lostFD: Int32, reason: String) {
        condition.lock()
        guard lostFD == fd, !reconnecting, closedReason == nil else {
            condition.unlock()
            return
        }
        // No session in a hello reply: a daemon without sessions, nothing could be resumed.
        if (helloReply != nil && helloReply.session == nil) || reconnectSeconds <= 0 || fatal != nil {
            closedReason = fatal.map { "armoryd closed the connection: \($0)" } ?? reason
            condition.broadcast()
            condition.unlock()
            return
        }
        reconnecting = true
        condition.broadcast()
        condition.unlock()
        shutdown(lostFD, Int32(SHUT_RDWR))
        let thread = Thread { [self] in reconnect(reason: reason) }
        thread.name = "armory-reconnect"
        thread.start()
    }

    /// What a give-up leaves undelivered, for the error (caller holds the lock).
    private var undelivered: String {
        "\(nextSeq - 1 - ackedUpTo) frame(s) after seq \(ackedUpTo) (seq \(ackedUpTo + 1)-\(nextSeq - 1), \(retainedBytes + output.bytes.count) bytes) were not delivered"
    }

    private func reconnect(reason: String) {
        let deadline = Date(timeIntervalSinceNow: reconnectSeconds)
        var delay = 0.02
        var last = reason
        while true {
            condition.lock()
            let closed = closedReason != nil
            condition.unlock()
            if closed { return }
            let candidates = explicitPath.map { [$0] } ?? SocketDiscovery.clientCandidates(environment: environment) { FileManager.default.fileExists(atPath: $0) }
            for path in candidates {
                switch Self.connect(path, sendTimeout: sendTimeout) {
                case .success(let newFD):
                    switch resume(on: newFD, path: path) {
                    case .done: return
                    case .retry(let why): last = why
                    }
                case .failure(let why): last = "\(path): \(why)"
                }
            }
            if Date() >= deadline {
                condition.lock()
                if closedReason == nil {
                    closedReason =
                        "armoryd did not come back within ARMORY_RECONNECT_SECONDS=\(Int(reconnectSeconds)) s (the connection broke: \(reason); last try: \(last)): \(undelivered). They are lost unless the daemon comes back; restart the evaluation once it runs."
                }
                reconnecting = false
                condition.broadcast()
                condition.unlock()
                return
            }
            Thread.sleep(forTimeInterval: delay)
            delay = min(delay * 2, 0.1)
        }
    }

    private enum ResumeOutcome {
        case done
        case retry(String)
    }

    /// Sends `hello` with `resume` on `newFD`, then what the daemon does not hold, in order.
    /// Without a session yet (the broken connection's `hello` was not answered), the kept frames,
    /// that `hello` first, simply go again on the new socket.
    private func resume(on newFD: Int32, path: String) -> ResumeOutcome {
        condition.lock()
        guard let session = helloReply?.session else {
            condition.unlock()
            return continueOn(newFD, path: path, held: 0, leftover: [])
        }
        let helloSeq = nextSeq
        nextSeq += 1
        var resuming = hello!
        resuming.resume = Hello.Resume(session: session, acked: ackedUpTo)
        condition.unlock()
        var frame = JSONWriter()
        frame.bytes.append(contentsOf: [0, 0, 0, 0])
        frame.write(ClientFrame(seq: helloSeq, op: .hello(resuming)).json)
        Frame.patchHeader(length: frame.bytes.count - 4, in: &frame.bytes, at: 0)
        var timeout = timeval(tv_sec: Int(connectTimeout), tv_usec: Int(connectTimeout.truncatingRemainder(dividingBy: 1) * 1e6))
        _ = setsockopt(newFD, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        if let failure = Self.writeAll(newFD, frame.bytes) {
            close(newFD)
            return .retry("resuming on \(path) failed: \(failure)")
        }
        var decoder = FrameDecoder()
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        var reply: DaemonMessage?
        while reply == nil {
            let n = buffer.withUnsafeMutableBytes { read(newFD, $0.baseAddress!, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                close(newFD)
                return .retry("resuming on \(path) failed: the daemon did not answer the handshake")
            }
            decoder.feed(buffer[0..<n])
            while case .frame(let payload) = decoder.next() {
                guard let message = try? DaemonMessage.decode(payload: payload) else { continue }
                switch message {
                case .reply(let seq, _) where seq == helloSeq: reply = message
                case .error(let error) where error.seq == helloSeq: reply = message
                default: continue
                }
                break
            }
        }
        timeout = timeval(tv_sec: 0, tv_usec: 0)
        _ = setsockopt(newFD, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        guard case .reply(_, let body) = reply!, let answer = HelloReply(json: body), case .continued(let held)? = answer.resumed else {
            let why: String
            switch reply! {
            case .error(let error): why = error.message
            case .reply(_, let body): why = body["reason"]?.stringValue ?? "unknown"
            default: why = "unknown"
            }
            condition.lock()
            if closedReason == nil {
                closedReason = "armoryd no longer holds this process's session \(helloReply.session ?? "") (\(why)): \(undelivered). Its runs end FAILED after the daemon's grace period; run the evaluation again."
            }
            reconnecting = false
            condition.broadcast()
            condition.unlock()
            close(newFD)
            return .done
        }
        return continueOn(newFD, path: path, held: held, leftover: decoder.remainingBytes)
    }

    /// Carries on over `newFD`: resends what the daemon does not hold, in order, then the rest.
    private func continueOn(_ newFD: Int32, path: String, held: UInt64, leftover: [UInt8]) -> ResumeOutcome {
        condition.lock()
        // Every kept frame after what the daemon holds goes again, in order, and before them each
        // request still waiting for its reply that they do not carry (its frame was acked or is
        // held: the daemon answers it again, or as the first time).
        let chunks = retained.filter { $0.last > held }
        // (Frames not written yet are carried by `output`, written right after.)
        let carriedFrom = chunks.first?.first ?? (output.bytes.isEmpty ? nextSeq : outputFirst)
        var resend = requestFrames.filter { $0.key < carriedFrom }.sorted { $0.key < $1.key }.flatMap(\.value)
        for chunk in chunks { resend.append(contentsOf: chunk.bytes) }
        condition.unlock()
        if let failure = Self.writeAll(newFD, resend) {
            close(newFD)
            return .retry("resending on \(path) failed: \(failure)")
        }
        condition.lock()
        let old = fd
        fd = newFD
        socketPath = path
        reconnecting = false
        resumes += 1
        condition.broadcast()
        condition.unlock()
        close(old)
        startReader(fd: newFD, leftover: leftover)
        return .done
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
        condition.lock()
        let fd = fd
        condition.unlock()
        shutdown(fd, Int32(SHUT_RDWR))
    }
}

/// The version of this client library.
public enum ArmoryTrackVersion {
    public static let current = "0.1.0"
}
