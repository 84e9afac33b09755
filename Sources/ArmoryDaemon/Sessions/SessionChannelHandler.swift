import ArmoryProtocol
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

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
            refuse(
                ProtocolError(
                    .frameTooLarge,
                    "A frame of \(length) bytes exceeds the daemon's limit of \(limit) bytes (hello's reply states it); it was skipped and the connection goes on. Keep params and tags within MLflow's limits, log large values as artifacts, and send artifacts in chunks (artifact_chunk).",
                    seq: peeked.seq, op: peeked.op), context: context)
            return
        }
        let bytes = Array(payload.readableBytesView)
        let now = WallClock.nowMs()
        let frame: ClientFrame
        do {
            frame = try ClientFrame.decode(payload: bytes, receivedAtMs: now, maxDepth: services.limits.maxDepth)
        } catch {
            refuse(error, context: context)
            return
        }
        if case .hello(let hello) = frame.op, let resume = hello.resume, session.machine.hello == nil {
            claim(resume, hello: hello, seq: frame.seq, context: context)
            return
        }
        carryOut(session.receive(frame, nowMs: now), for: frame, context: context)
    }

    /// Answers a frame that could not be read, with the `seq` the session assigns it.
    private func refuse(_ error: ProtocolError, context: ChannelHandlerContext) {
        if let error = session.event({ $0.refuseUnreadable(error) }) { send(.error(error), context: context) }
    }

    /// Carries out what the session decided about `frame`.
    private func carryOut(_ action: SessionAction, for frame: ClientFrame, context: ChannelHandlerContext) {
        switch action {
        case .none:
            break
        case .reply(let body):
            send(.reply(seq: frame.seq, body: body), context: context)
        case .error(let error):
            send(.error(error), context: context)
        case .close(let error):
            sendThenClose(.error(error), context: context)
        case .handshake(let hello):
            handshake(hello, frame: frame, context: context)
        case .askDestination(let query):
            let uploader = services.destinations.uploader(session.machine.destination)
            answerLater(frame, context: context) { reply in
                uploader.callSink(
                    { (sink) async throws(ProtocolError) -> JSONObject in
                        switch query {
                        case .experiment(let name, let create):
                            let id = try await sink.experiment(named: name, create: create)
                            return ["experiment_id": id.map { .string($0) } ?? .null]
                        case .setExperimentTag(let experimentID, let key, let value):
                            try await sink.setExperimentTag(experimentID: experimentID, key: key, value: value)
                            return [:]
                        }
                    }, reply)
            }
        case .findRun(let runID):
            let uploader = services.destinations.uploader(session.machine.destination)
            let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            uploader.findRun(runID: runID) { stored in
                loopBound.eventLoop.execute {
                    let (handler, context) = loopBound.value
                    let action = handler.session.runFound(stored, runID: runID, in: uploader, for: frame)
                    handler.carryOut(action, for: frame, context: context)
                    context.flush()
                }
            }
        case .awaitDurable(let timeoutMs):
            let uploaders = session.destinationsWritten
            answerWhen(Self.durable(session.durabilityWaits), timeoutMs: timeoutMs, acking: session.handledSeq, context: context) { complete in
                let warnings = uploaders.compactMap { $0.needsCredentials.map(Self.credentialsWarning) }
                return .reply(seq: frame.seq, body: FlushReply(complete: complete, pendingRecords: 0, level: .durable, warnings: warnings).json)
            }
        case .awaitUploaded(let timeoutMs):
            // Uploaded implies durable: the ack covering the flushed frames comes before the reply.
            // A destination that refuses the credentials fails the wait at once: nothing would land.
            let waits = session.uploadWaits
            let abort: @Sendable () -> DaemonMessage? = {
                guard let reason = waits.lazy.compactMap({ $0.uploader.pending(upTo: $0.ticket) > 0 ? $0.uploader.needsCredentials : nil }).first else { return nil }
                return .error(ProtocolError(.authRequired, Self.credentialsWarning(reason), seq: frame.seq, op: frame.op.name))
            }
            answerWhen(Self.settled(waits) + Self.durable(session.durabilityWaits), timeoutMs: timeoutMs, acking: session.handledSeq, context: context, abort: abort) { complete in
                let pending = complete ? 0 : waits.reduce(0) { $0 + $1.uploader.pending(upTo: $1.ticket) }
                return .reply(seq: frame.seq, body: FlushReply(complete: complete, pendingRecords: pending, level: .uploaded).json)
            }
        case .awaitRun(let handle, let timeoutMs):
            let registry = services.registry
            let gone = DaemonMessage.error(ProtocolError(.unknownHandle, "Run \(handle) is gone.", seq: frame.seq, op: frame.op.name))
            guard let entry = registry.entry(handle) else {
                send(gone, context: context)
                break
            }
            let wait = session.creationWait(of: entry)
            answerWhen(Self.settled([wait]), timeoutMs: timeoutMs, context: context) { _ in
                guard let entry = registry.entry(handle) else { return gone }
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
        case .openSpool(let id, let path):
            let failure = session.openSpool(artifact: id, path: path)
            carryOut(
                session.event { machine in
                    failure.map { machine.spoolFailed(artifact: id, reason: $0, for: frame) } ?? machine.spoolOpened(artifact: id, for: frame)
                }, for: frame, context: context)
        case .writeSpool(let id, let bytes):
            if let reason = session.writeSpool(artifact: id, bytes: bytes) {
                carryOut(session.event { $0.spoolFailed(artifact: id, reason: reason, for: frame) }, for: frame, context: context)
            }
        case .closeSpool(let id):
            guard let file = session.takeSpool(artifact: id) else {
                carryOut(session.event { $0.spoolClosed(artifact: id, for: frame) }, for: frame, context: context)
                break
            }
            // The fsync goes to a thread pool: a large file's would hold back every connection of
            // this event loop. This connection's next frames wait their turn.
            heldBack = []
            let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            NIOThreadPool.singleton.runIfActive(eventLoop: context.eventLoop) { file.putOnDisk() }.whenComplete { result in
                let (handler, context) = loopBound.value
                let failure: String? =
                    switch result {
                    case .success(let failure): failure
                    case .failure(let error): "\(error)"
                    }
                handler.carryOut(
                    handler.session.event { machine in
                        failure.map { machine.spoolFailed(artifact: id, reason: $0, for: frame) } ?? machine.spoolClosed(artifact: id, for: frame)
                    }, for: frame, context: context)
                handler.readHeldBack(context: context)
            }
        case .query(let query):
            let answer: SessionAction
            do {
                answer = .reply(try services.answer(query, peer: session.peer, destination: session.machine.destination, hello: session.machine.hello))
            } catch {
                answer = .error(error)
            }
            carryOut(session.event { $0.answered(frame, answer) }, for: frame, context: context)
        }
        if session.wantsPause && !paused { pause(context: context) }
    }

    /// The handshake of a new session: its destination is resolved (credentials, the user's
    /// share of destinations), then hello is answered; `notResumedReason` says why a `resume`
    /// it carried opened a new session instead.
    private func handshake(_ hello: Hello, frame: ClientFrame, context: ChannelHandlerContext) {
        let destination: DestinationKey
        do {
            destination = try resolveDestination(hello)
        } catch {
            send(.error(error.answering(frame)), context: context)
            return
        }
        session.accept(hello, destination: destination, connectionID: session.connectionID, peer: session.peer, resumed: false)
        if !opened {
            opened = true
            services.sessions.opened(session, connection: session.connectionID, close: closeConnection)
        }
        let resumed: HelloReply.Resumed? = hello.resume.map { _ in .notResumed(reason: notResumedReason ?? "unknown") }
        send(.reply(seq: frame.seq, body: helloReply(hello, resumed: resumed).json), context: context)
    }

    /// Why a `resume` in this connection's `hello` opened a new session instead.
    private var notResumedReason: String?

    private func resolveDestination(_ hello: Hello) throws(ProtocolError) -> DestinationKey {
        try services.destinations.resolve(trackingURI: hello.trackingURI, credentials: hello.credentials, peerUID: session.peer.uid)
    }

    private func helloReply(_ h: Hello, resumed: HelloReply.Resumed?) -> HelloReply {
        let destinationURI = services.destinations.uploader(session.machine.destination).destination.split(separator: " ").first.map(String.init)
        return HelloReply(
            daemonVersion: DaemonVersion.current, protocolVersion: h.protocolVersion, limits: services.limits, uid: session.peer.uid,
            pid: session.peer.pid, destination: destinationURI, session: session.id, resumed: resumed)
    }

    /// Answers `frame` with what `body` reports later, from any thread.
    private func answerLater(_ frame: ClientFrame, context: ChannelHandlerContext, _ body: (@escaping @Sendable (Result<JSONObject, ProtocolError>) -> Void) -> Void) {
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        body { result in
            loopBound.eventLoop.execute {
                let (handler, context) = loopBound.value
                switch result {
                case .success(let reply): handler.send(.reply(seq: frame.seq, body: reply), context: context)
                case .failure(let error): handler.send(.error(error.answering(frame)), context: context)
                }
                context.flush()
            }
        }
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
                handler.settle(claim, of: resume, fresh: fresh, hello: hello, seq: seq, context: context)
            }
        }
    }

    private func settle(_ claim: SessionTable.Claim, of resume: Hello.Resume, fresh: Session, hello: Hello, seq: UInt64, context: ChannelHandlerContext) {
        let frame = ClientFrame(seq: seq, op: .hello(hello))
        switch claim {
        case .session(let resumed):
            adopt(resumed, from: fresh, hello: hello, frame: frame, context: context)
        case .restored(let record):
            let restored = Session(restoring: record, services: services)
            services.sessions.opened(restored, connection: fresh.connectionID, close: closeConnection)
            adopt(restored, from: fresh, hello: hello, frame: frame, context: context)
        case .refused(let error):
            carryOut(.error(error.answering(frame)), for: frame, context: context)
        case .notFound(let reason) where resume.acked != 0, .ended(let reason):
            notResumedReason = reason
            carryOut(fresh.receive(frame, nowMs: WallClock.nowMs()), for: frame, context: context)
        case .notFound(let reason):
            // Nothing of the session was ever acknowledged, so its client still holds every frame
            // it sent: a crash took the session before its first group commit. It starts again
            // under its id, and the client sends it all (docs/architecture.md, "Sessions outlive
            // connections").
            let again = Session(id: resume.session, connectionID: fresh.connectionID, peer: fresh.peer, services: services) { _ in }
            logger.info("session started again: nothing of it was acknowledged", metadata: ["session": "\(again.id)", "was": "\(reason)"])
            services.sessions.opened(again, connection: fresh.connectionID, close: closeConnection)
            adopt(again, from: fresh, hello: hello, frame: frame, context: context)
        }
        readHeldBack(context: context)
    }

    /// Reads the frames that arrived while an answer was pending (a claim, a spool file going
    /// on disk), in order.
    private func readHeldBack(context: ChannelHandlerContext) {
        let waiting = heldBack ?? []
        heldBack = nil
        for data in waiting { channelRead(context: context, data: data) }
        channelReadComplete(context: context)
    }

    /// The client continues `resumed` on this connection: its frames after the `seq` the reply
    /// names are expected again, its runs are its own again.
    private func adopt(_ resumed: Session, from fresh: Session, hello: Hello, frame: ClientFrame, context: ChannelHandlerContext) {
        fresh.reportTo(nil)
        resumed.reportTo(Self.reporter(for: context.channel, peer: fresh.peer, statistics: services.statistics))
        session = resumed
        opened = true
        ackedSeq = 0
        let destination: DestinationKey
        do throws(ProtocolError) {
            if let unsupported = SessionStateMachine.unsupported(hello) { throw unsupported }
            destination = try resolveDestination(hello)
        } catch {
            sendThenClose(.error(error.answering(frame)), context: context)
            return
        }
        resumed.accept(hello, destination: destination, connectionID: fresh.connectionID, peer: fresh.peer, resumed: true)
        send(.reply(seq: frame.seq, body: helloReply(hello, resumed: .continued(held: resumed.handledSeq)).json), context: context)
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
                guard Self.countDown(remaining) else { return }
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
            if session.machine.endsWithConnection {
                services.sessions.ended(session)
            } else {
                services.sessions.detached(session)
            }
        } else {
            services.statistics.disconnected(session.connectionID)
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        switch error {
        case let tooLarge as FrameChannelDecoder.FrameTooLarge:
            logger.warning("closing connection: not an armoryd client", metadata: ["length": "\(tooLarge.length)", "pid": "\(session.peer.pid)"])
            let error = ProtocolError(
                .frameTooLarge,
                "A frame announced \(tooLarge.length) bytes, far beyond the daemon's limit of \(tooLarge.limit) bytes: this does not look like an armoryd client (frames are a 4-byte big-endian length, then JSON; proto/PROTOCOL.md), so the connection is closed.",
                seq: session.handledSeq + 1)
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
        waits.map { w in { done in w.uploader.whenSettled(upTo: w.ticket, runs: w.runs, done) } }
    }

    /// Registrations for each journal holding its records on disk (a group commit at once).
    private static func durable(_ waits: [DurableWait]) -> [Registration] {
        waits.map { w in { done in w.uploader.whenDurable(w.lsn, urgent: true, done) } }
    }

    /// Answers once every registration called back, or when the bound runs out (`complete` false).
    /// `acking`: frames up to this seq are durable once complete; their ack goes before the answer.
    /// `abort`, checked every half second while waiting, answers early when it has an answer.
    private func answerWhen(
        _ registrations: [Registration], timeoutMs: Int64, acking: UInt64? = nil, context: ChannelHandlerContext,
        abort: (@Sendable () -> DaemonMessage?)? = nil, _ answer: @escaping @Sendable (Bool) -> DaemonMessage
    ) {
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
                guard Self.countDown(remaining) else { return }
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

    /// Counts one callback of several down; true for the last one.
    private static func countDown(_ remaining: NIOLockedValueBox<Int>) -> Bool {
        remaining.withLockedValue { count in
            count -= 1
            return count == 0
        }
    }

    private func whenAllDrained(_ uploaders: [Uploader], uid: UInt32, _ body: @escaping @Sendable () -> Void) {
        let remaining = NIOLockedValueBox(uploaders.count)
        for uploader in uploaders {
            uploader.whenDrained(uid: uid) {
                if Self.countDown(remaining) {
                    body()
                }
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
