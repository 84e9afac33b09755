import ArmoryProtocol
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// The daemon's Unix socket as a service: every connection gets a `SessionChannelHandler`. On
/// graceful shutdown it stops accepting and closes every connection (their sessions detach and
/// wait for a resume), so that nothing is enqueued once the uploaders drain.
public final class SocketListener: Service {
    private let configuration: DaemonConfiguration
    private let services: DaemonServices
    private let logger: Logger
    private let connections = Mutex<[ObjectIdentifier: Channel]>([:])
    private let nextConnection = Atomic<UInt64>(1)
    private let openConnections = Atomic<Int>(0)
    private let server = Mutex<Channel?>(nil)

    init(configuration: DaemonConfiguration, services: DaemonServices, logger: Logger) {
        self.configuration = configuration
        self.services = services
        self.logger = logger
    }

    /// Binds the socket (or adopts systemd's): connections are accepted from here on.
    func bind(group: MultiThreadedEventLoopGroup) async throws {
        let config = configuration
        let services = services
        let logger = logger
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 256)
            .childChannelOption(ChannelOptions.maxMessagesPerRead, value: 4)
            // Replies a client does not read stop its reads instead of piling up in memory.
            .childChannelOption(ChannelOptions.writeBufferWaterMark, value: .init(low: 256 << 10, high: 1 << 20))
            .childChannelInitializer { [self] channel in
                let connection = nextConnection.wrappingAdd(1, ordering: .relaxed).oldValue
                let open = openConnections.wrappingAdd(1, ordering: .relaxed).newValue
                channel.closeFuture.whenComplete { _ in self.openConnections.wrappingSubtract(1, ordering: .relaxed) }
                if open > config.maxConnections {
                    logger.warning("connection refused: too many connections", metadata: ["limit": "\(config.maxConnections)"])
                    let error = ProtocolError(.tooManyConnections, "armoryd already serves \(config.maxConnections) connections (--max-connections); close idle clients or raise the limit.")
                    return channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(RefusingHandler(error: error)) }
                }
                guard let provider = channel as? SocketOptionProvider else {
                    return channel.eventLoop.makeFailedFuture(DaemonStartError.socket("no socket options on channel"))
                }
                return provider.unsafeGetSocketOption(level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(SO_PEERCRED))
                    .flatMapThrowing { (cred: LinuxPeerCredentials) in
                        let peer = PeerCredentials(uid: cred.uid, gid: cred.gid, pid: cred.pid)
                        let key = ObjectIdentifier(channel)
                        self.connections.withLock { $0[key] = channel }
                        channel.closeFuture.whenComplete { _ in _ = self.connections.withLock { $0.removeValue(forKey: key) } }
                        let session = Session(connectionID: connection, peer: peer, services: services, report: SessionChannelHandler.reporter(for: channel, peer: peer, statistics: services.statistics))
                        let handler = SessionChannelHandler(session: session, services: services, logger: logger) { channel.close(promise: nil) }
                        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameChannelDecoder(maxFrameBytes: config.limits.maxFrameBytes)))
                        try channel.pipeline.syncOperations.addHandler(handler)
                    }
            }
        let channel: Channel
        if let adopted = config.adoptedSocket {
            channel = try await bootstrap.withBoundSocket(adopted).get()
        } else {
            // Create the socket file with the final mode from the start (no window with a looser one).
            let oldMask = umask(0o177)
            defer { umask(oldMask) }
            channel = try await bootstrap.bind(unixDomainSocketPath: config.socketPath).get()
        }
        server.withLock { $0 = channel }
        if config.adoptedSocket == nil { chmod(config.socketPath, config.socketMode) }
    }

    /// Serves until the graceful shutdown, then closes the socket and every connection.
    public func run() async throws {
        try? await gracefulShutdown()
        logger.notice("shutting down: no new connections; draining queued records", metadata: ["bound_s": "\(configuration.shutdownDrainSeconds)"])
        try? await server.withLock({ $0 })?.close()
        if configuration.adoptedSocket == nil { unlink(configuration.socketPath) }  // systemd's socket stays for the next start
        for channel in connections.withLock({ Array($0.values) }) { try? await channel.close() }
    }
}

/// The uploaders' last act: once no connection is left, queued records get the drain bound
/// (`--shutdown-drain`) to reach their destinations; what is left stays in the journal.
struct UploadDrain: Service {
    let destinations: Destinations
    let boundSeconds: Double
    let logger: Logger

    func run() async throws {
        try? await gracefulShutdown()
        let left = await destinations.shutdown(timeout: boundSeconds)
        if left > 0 { logger.warning("shutdown bound reached with records still queued", metadata: ["records": "\(left)"]) }
    }
}

/// Linux's `struct ucred` (what `SO_PEERCRED` returns); Glibc hides it behind `_GNU_SOURCE`.
struct LinuxPeerCredentials: Sendable {
    var pid: Int32 = 0
    var uid: UInt32 = 0
    var gid: UInt32 = 0
}

/// Answers a connection the daemon cannot serve with one error frame, then closes it.
final class RefusingHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let error: ProtocolError

    init(error: ProtocolError) { self.error = error }

    func channelActive(context: ChannelHandlerContext) {
        let bytes = DaemonMessage.error(error).encoded
        var buffer = context.channel.allocator.buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(buffer)).whenComplete { _ in channel.close(promise: nil) }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}  // nothing it sends is read
}
