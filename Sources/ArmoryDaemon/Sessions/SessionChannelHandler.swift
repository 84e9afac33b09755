import ArmoryProtocol
import Logging
import NIOConcurrencyHelpers
import NIOCore

/// Carries out a `Session`'s outcomes on one connection: decodes frames, writes replies and
/// errors, acknowledges frames once their records are in the journal on disk (at most one ack
/// waiting per connection, so acks coalesce to one per group commit), pauses reading while the
/// uploader is overloaded. A `hello` with `resume` swaps in the session it names.
final class SessionChannelHandler: ChannelInboundHandler {
    typealias InboundIn = DecodedFrame
    typealias OutboundOut = ByteBuffer

    private var session: Session
    private let services: DaemonServices
    private let logger: Logger
    /// Closes this connection from any thread (a resume elsewhere takes its session).
    private let closeConnection: @Sendable () -> Void
    /// The session is registered in the table (its hello was answered).
    private var opened = false
    /// Frames that arrived while a resume was being settled, handled after it.
    private var heldBack: [NIOAny]?
    private var ackedSeq: UInt64 = 0
    /// An ack is waiting for the journal.
    private var ackWaiting = false
    private var framesSinceFlush = 0
    private var paused = false

    init(session: Session, services: DaemonServices, logger: Logger, closeConnection: @escaping @Sendable () -> Void) {
        self.session = session
        self.services = services
        self.logger = logger
        self.closeConnection = closeConnection
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if heldBack != nil {
            heldBack!.append(data)
            return
        }
        framesSinceFlush += 1
        let payload: ByteBuffer
        switch unwrapInboundIn(data) {
        case .frame(let bytes):
            payload = bytes
        case .tooLarge(let length, let head, let tail):
            let peeked = FramePeek.opAndSeq(head + [UInt8(ascii: " ")] + tail)
            logger.warning("frame too large, skipped", metadata: ["length": "\(length)", "op": "\(peeked.op ?? "?")", "pid": "\(session.peer.pid)"])
            let limit = services.limits.maxFrameBytes
            refuse(ProtocolError(.frameTooLarge, "A frame of \(length) bytes exceeds the daemon's limit of \(limit) bytes (hello's reply states it); it was skipped and the connection goes on. Keep params and tags within MLflow's limits, log large values as artifacts, and send artifacts in chunks (artifact_chunk).", seq: peeked.seq, op: peeked.op), context: context)
            return
        }
        let bytes = Array(payload.readableBytesView)
        let now = DaemonServices.nowMs()
        let frame: ClientFrame
        do {
            frame = try ClientFrame.decode(payload: bytes, receivedAtMs: now, maxDepth: services.limits.maxDepth)
        } catch {
            refuse(error, context: context)
            return
        }
        if case .hello(let hello) = frame.op, let resume = hello.resume, session.hello == nil {
            claim(resume, hello: hello, seq: frame.seq, context: context)
            return
        }
        carryOut(session.handle(frame, nowMs: now), for: frame, context: context)
    }

    /// Answers a frame that could not be read, with the `seq` the session assigns it.
    private func refuse(_ error: ProtocolError, context: ChannelHandlerContext) {
        if let error = session.refuseUnreadable(error) { send(.error(error), context: context) }
    }

    /// Carries out what the session decided about `frame`.
    private func carryOut(_ outcome: SessionOutcome, for frame: ClientFrame, context: ChannelHandlerContext) {
        if case .hello = frame.op, case .reply = outcome, !opened {
            opened = true
            services.sessions.opened(session, connection: session.connectionID, close: closeConnection)
        }
        switch outcome {
        case .none:
            break
        case .reply(let body):
            send(.reply(seq: frame.seq, body: body), context: context)
        case .error(let error):
            send(.error(error), context: context)
        case .close(let error):
            sendThenClose(.error(error), context: context)
        case .deferred(let body):
            let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            let seq = frame.seq
            body { result in
                loopBound.eventLoop.execute {
                    let (handler, context) = loopBound.value
                    switch result {
                    case .success(let reply): handler.send(.reply(seq: seq, body: reply), context: context)
                    case .failure(var error):
                        error.seq = seq
                        handler.send(.error(error), context: context)
                    }
                    context.flush()
                }
            }
        case .awaitDurable(let waits, let timeoutMs):
            let uploaders = session.destinationsWritten
            answerWhen(Self.durable(waits), timeoutMs: timeoutMs, acking: session.handledSeq, context: context) { complete in
                let warnings = uploaders.compactMap { $0.needsCredentials.map(Self.credentialsWarning) }
                return .reply(seq: frame.seq, body: FlushReply(complete: complete, pendingRecords: 0, level: .durable, warnings: warnings).json)
            }
        case .awaitUploaded(let waits, let timeoutMs):
            // Uploaded implies durable: the ack covering the flushed frames comes before the reply.
            // A destination that refuses the credentials fails the wait at once: nothing would land.
            let abort: @Sendable () -> DaemonMessage? = {
                guard let reason = waits.lazy.compactMap({ $0.uploader.pending(upTo: $0.ticket) > 0 ? $0.uploader.needsCredentials : nil }).first else { return nil }
                return .error(ProtocolError(.authRequired, Self.credentialsWarning(reason), seq: frame.seq, op: frame.op.name))
            }
            answerWhen(Self.settled(waits) + Self.durable(session.durabilityWaits), timeoutMs: timeoutMs, acking: session.handledSeq, context: context, abort: abort) { complete in
                let pending = complete ? 0 : waits.reduce(0) { $0 + $1.uploader.pending(upTo: $1.ticket) }
                return .reply(seq: frame.seq, body: FlushReply(complete: complete, pendingRecords: pending, level: .uploaded).json)
            }
        case .awaitRun(let handle, let wait, let timeoutMs):
            let registry = services.registry
            answerWhen(Self.settled([wait]), timeoutMs: timeoutMs, context: context) { _ in
                guard let entry = registry.entry(handle) else {
                    return .error(ProtocolError(.unknownHandle, "Run \(handle) is gone.", seq: frame.seq, op: frame.op.name))
                }
                if var failure = entry.failure {
                    failure.seq = frame.seq
                    failure.op = frame.op.name
                    return .error(failure)
                }
                var descriptor = entry.descriptor
                if let bound = wait.uploader.binding(of: handle) {  // the create's completion may still be on its way
                    descriptor.runID = bound.runID
                    descriptor.experimentID = bound.experimentID ?? descriptor.experimentID
                }
                return .reply(seq: frame.seq, body: descriptor.json)
            }
        }
        if session.wantsPause && !paused { pause(context: context) }
    }

    /// `hello` with `resume`: takes the session it names (closing an older connection that still
    /// carries it), then answers; frames arriving meanwhile wait their turn.
    private func claim(_ resume: Hello.Resume, hello: Hello, seq: UInt64, context: ChannelHandlerContext) {
        heldBack = []
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        let fresh = session
        services.sessions.claim(resume.session, uid: fresh.peer.uid, connection: fresh.connectionID, close: closeConnection) { claim in
            loopBound.eventLoop.execute {
                let (handler, context) = loopBound.value
                handler.settle(claim, fresh: fresh, hello: hello, seq: seq, context: context)
            }
        }
    }

    private func settle(_ claim: SessionTable.Claim, fresh: Session, hello: Hello, seq: UInt64, context: ChannelHandlerContext) {
        let frame = ClientFrame(seq: seq, op: .hello(hello))
        switch claim {
        case .session(let resumed):
            adopt(resumed, from: fresh, hello: hello, frame: frame, context: context)
        case .restored(let record):
            let restored = Session(restoring: record, services: services)
            services.sessions.opened(restored, connection: fresh.connectionID, close: closeConnection)
            adopt(restored, from: fresh, hello: hello, frame: frame, context: context)
        case .refused(var error):
            error.seq = seq
            error.op = "hello"
            carryOut(.error(error), for: frame, context: context)
        case .notFound(let reason):
            fresh.notResumedReason = reason
            carryOut(fresh.handle(frame, nowMs: DaemonServices.nowMs()), for: frame, context: context)
        }
        let waiting = heldBack ?? []
        heldBack = nil
        for data in waiting { channelRead(context: context, data: data) }
        channelReadComplete(context: context)
    }

    private func adopt(_ resumed: Session, from fresh: Session, hello: Hello, frame: ClientFrame, context: ChannelHandlerContext) {
        resumed.attach(connectionID: fresh.connectionID, peer: fresh.peer, reportLater: Self.reporter(for: context.channel, peer: fresh.peer, statistics: services.statistics))
        session = resumed
        opened = true
        ackedSeq = 0
        let outcome = resumed.resume(hello, seq: frame.seq)
        if case .error = outcome {
            carryOut(outcome, for: frame, context: context)
            context.close(promise: nil)
            return
        }
        carryOut(outcome, for: frame, context: context)
    }

    /// Sends a session's later errors (those of fire-and-forget ops, known once the sink acted)
    /// on `channel`, from any thread.
    static func reporter(for channel: Channel, peer: PeerCredentials, statistics: DaemonStatistics) -> @Sendable (ProtocolError) -> Void {
        let loopBound = NIOLoopBound(channel, eventLoop: channel.eventLoop)
        return { error in
            statistics.refused(error, peer: peer)
            loopBound.eventLoop.execute {
                let bytes = DaemonMessage.error(error).encoded
                var buffer = loopBound.value.allocator.buffer(capacity: bytes.count)
                buffer.writeBytes(bytes)
                loopBound.value.writeAndFlush(buffer, promise: nil)
            }
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        session.commit()
        if session.wantsPause && !paused { pause(context: context) }
        requestAck(context: context)
        services.statistics.count(frames: UInt64(framesSinceFlush), metrics: session.takeAcceptedMetrics())
        framesSinceFlush = 0
        context.flush()
    }

    /// Acks everything handled so far once the journal holds it: at once when it already does,
    /// else after the next group commit (then once more for whatever arrived meanwhile).
    private func requestAck(context: ChannelHandlerContext) {
        let seq = session.handledSeq
        guard !ackWaiting, seq > ackedSeq else { return }
        let pending = session.durabilityWaits.filter { !$0.uploader.isDurable($0.lsn) }
        guard !pending.isEmpty else {
            ackedSeq = seq
            send(.ack(upto: seq), context: context)
            return
        }
        ackWaiting = true
        let remaining = NIOLockedValueBox(pending.count)
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        for wait in pending {
            wait.uploader.whenDurable(wait.lsn) {
                guard remaining.withLockedValue({ $0 -= 1; return $0 }) == 0 else { return }
                loopBound.eventLoop.execute {
                    let (handler, context) = loopBound.value
                    handler.ackWaiting = false
                    if seq > handler.ackedSeq {
                        handler.ackedSeq = seq
                        handler.send(.ack(upto: seq), context: context)
                    }
                    handler.requestAck(context: context)
                    context.flush()
                }
            }
        }
    }

    /// A client that does not read its replies stops being read until it catches up.
    func channelWritabilityChanged(context: ChannelHandlerContext) {
        let writable = context.channel.isWritable
        context.channel.setOption(ChannelOptions.autoRead, value: writable && !paused).whenComplete { _ in }
        if writable && !paused { context.read() }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if opened {
            _ = session.connectionClosed()
            services.sessions.detached(session)
        } else {
            services.statistics.disconnected(session.connectionID)
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        switch error {
        case let tooLarge as FrameChannelDecoder.FrameTooLarge:
            logger.warning("closing connection: not an armoryd client", metadata: ["length": "\(tooLarge.length)", "pid": "\(session.peer.pid)"])
            let error = ProtocolError(.frameTooLarge, "A frame announced \(tooLarge.length) bytes, far beyond the daemon's limit of \(tooLarge.limit) bytes: this does not look like an armoryd client (frames are a 4-byte big-endian length, then JSON; proto/PROTOCOL.md), so the connection is closed.", seq: session.handledSeq + 1)
            sendThenClose(.error(error), context: context)
            return
        case let truncated as FrameChannelDecoder.TruncatedFrame:
            logger.info("connection closed mid-frame", metadata: ["bytes": "\(truncated.bytes)", "pid": "\(session.peer.pid)"])
        default:
            logger.debug("connection error: \(error)", metadata: ["pid": "\(session.peer.pid)"])
        }
        context.close(promise: nil)
    }

    /// Writes `message` (after anything already queued), then closes the connection.
    private func sendThenClose(_ message: DaemonMessage, context: ChannelHandlerContext) {
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(buffer(for: message, context: context))).whenComplete { _ in channel.close(promise: nil) }
    }

    private func send(_ message: DaemonMessage, context: ChannelHandlerContext) {
        context.write(wrapOutboundOut(buffer(for: message, context: context)), promise: nil)
    }

    private func buffer(for message: DaemonMessage, context: ChannelHandlerContext) -> ByteBuffer {
        if case .error(let error) = message { services.statistics.refused(error, peer: session.peer) }
        let bytes = message.encoded
        var buffer = context.channel.allocator.buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        return buffer
    }

    /// A callback registration: calls its argument once what it waits for happened.
    private typealias Registration = (@escaping @Sendable () -> Void) -> Void

    /// Registrations for each uploader settling its ticket.
    private static func settled(_ waits: [UploadWait]) -> [Registration] {
        waits.map { w in { done in w.uploader.whenSettled(upTo: w.ticket, done) } }
    }

    /// Registrations for each journal holding its records on disk (a group commit at once).
    private static func durable(_ waits: [DurableWait]) -> [Registration] {
        waits.map { w in { done in w.uploader.whenDurable(w.lsn, urgent: true, done) } }
    }

    /// Answers once every registration called back, or when the bound runs out (`complete` false).
    /// `acking`: frames up to this seq are durable once complete; their ack goes before the answer.
    /// `abort`, checked every half second while waiting, answers early when it has an answer.
    private func answerWhen(_ registrations: [Registration], timeoutMs: Int64, acking: UInt64? = nil, context: ChannelHandlerContext,
                            abort: (@Sendable () -> DaemonMessage?)? = nil, _ answer: @escaping @Sendable (Bool) -> DaemonMessage) {
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        let answered = NIOLoopBoundBox(false, eventLoop: context.eventLoop)
        let checks = NIOLoopBoundBox<RepeatedTask?>(nil, eventLoop: context.eventLoop)
        let respondWith: @Sendable (Bool, DaemonMessage?) -> Void = { complete, early in
            loopBound.eventLoop.execute {
                guard !answered.value else { return }
                answered.value = true
                checks.value?.cancel()
                let (handler, context) = loopBound.value
                if complete, let acking, acking > handler.ackedSeq {
                    handler.ackedSeq = acking
                    handler.send(.ack(upto: acking), context: context)
                }
                handler.send(early ?? answer(complete), context: context)
                context.flush()
            }
        }
        let respond: @Sendable (Bool) -> Void = { respondWith($0, nil) }
        if let abort {
            checks.value = context.eventLoop.scheduleRepeatedTask(initialDelay: .zero, delay: .milliseconds(500)) { _ in
                if let early = abort() { respondWith(false, early) }
            }
        }
        let timeout = context.eventLoop.scheduleTask(in: .milliseconds(timeoutMs)) { respond(false) }
        let remaining = NIOLockedValueBox(registrations.count)
        if registrations.isEmpty {
            timeout.cancel()
            respond(true)
        }
        for register in registrations {
            register {
                guard remaining.withLockedValue({ $0 -= 1; return $0 }) == 0 else { return }
                timeout.cancel()
                respond(true)
            }
        }
    }

    /// What a client is told while a destination refuses the daemon's credentials.
    static func credentialsWarning(_ reason: String) -> String {
        "\(reason). Your records are kept in armoryd's journal and upload by themselves once working credentials arrive: "
            + "write them to the daemon's credentials file (/etc/armory/credentials, or $ARMORY_HOME/credentials for your own daemon; a [<tracking URI>] section) "
            + "and run `systemctl reload armoryd`, or run an evaluation with MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) set to working ones."
    }

    private func whenAllDrained(_ uploaders: [Uploader], uid: UInt32, _ body: @escaping @Sendable () -> Void) {
        let remaining = NIOLockedValueBox(uploaders.count)
        for uploader in uploaders {
            uploader.whenDrained(uid: uid) {
                if remaining.withLockedValue({ $0 -= 1; return $0 }) == 0 { body() }
            }
        }
    }

    private func pause(context: ChannelHandlerContext) {
        paused = true
        context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        let uid = session.peer.uid
        let overloaded = services.destinations.all.filter { $0.isOverloaded(uid: uid) }
        whenAllDrained(overloaded.isEmpty ? [services.uploader] : overloaded, uid: uid) {
            loopBound.eventLoop.execute {
                let (handler, context) = loopBound.value
                handler.paused = false
                handler.session.clearPause()
                context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
                context.read()
            }
        }
    }
}
