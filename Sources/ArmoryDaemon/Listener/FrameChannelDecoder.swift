import ArmoryProtocol
import NIOCore

/// What the connection's bytes are split into: frame payloads, and frames over the limit that
/// were skipped (their length prefix says where the next frame starts).
enum DecodedFrame {
    case frame(ByteBuffer)
    /// A frame of `length` bytes over the limit, skipped; `head` and `tail` are its first and last
    /// bytes, enough to read its `op` and `seq` in most frames.
    case tooLarge(length: Int, head: [UInt8], tail: [UInt8])
}

/// Splits the connection's bytes into frame payloads (4-byte big-endian length, then JSON). A
/// frame over the limit is skipped as its bytes arrive, without holding them, and reported, so
/// that the connection and the frames after it carry on.
struct FrameChannelDecoder: ByteToMessageDecoder {
    typealias InboundOut = DecodedFrame

    /// How many bytes of a skipped frame are kept from its start and from its end.
    static let peekBytes = 512

    let maxFrameBytes: Int
    /// The frame being skipped: its length, the bytes still to skip, and what was kept of it.
    private var skipping: (length: Int, remaining: Int, head: [UInt8], tail: [UInt8])?

    init(maxFrameBytes: Int) {
        self.maxFrameBytes = maxFrameBytes
    }

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        if var skip = skipping {
            let n = min(skip.remaining, buffer.readableBytes)
            guard n > 0 else { return .needMoreData }
            let bytes = buffer.readSlice(length: n)!
            if skip.head.count < Self.peekBytes {
                skip.head += bytes.readableBytesView.prefix(Self.peekBytes - skip.head.count)
            }
            skip.tail = Array((skip.tail + bytes.readableBytesView.suffix(Self.peekBytes)).suffix(Self.peekBytes))
            skip.remaining -= n
            if skip.remaining > 0 {
                skipping = skip
                return .needMoreData
            }
            skipping = nil
            context.fireChannelRead(wrapInboundOut(.tooLarge(length: skip.length, head: skip.head, tail: skip.tail)))
            return .continue
        }
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return .needMoreData }
        guard Int(length) <= maxFrameBytes else {
            guard Int(length) <= maxFrameBytes * Self.skippableFactor else {
                throw FrameTooLarge(length: Int(length), limit: maxFrameBytes)
            }
            buffer.moveReaderIndex(forwardBy: Frame.headerSize)
            skipping = (Int(length), Int(length), [], [])
            return .continue
        }
        guard buffer.readableBytes >= Frame.headerSize + Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: Frame.headerSize)
        context.fireChannelRead(wrapInboundOut(.frame(buffer.readSlice(length: Int(length))!)))
        return .continue
    }

    mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        if buffer.readableBytes > 0 || skipping != nil {
            throw TruncatedFrame(bytes: buffer.readableBytes)
        }
        return .needMoreData
    }

    /// A frame this far over the limit is not skipped: the peer is most likely not speaking the
    /// protocol at all (`GET ` read as a length is 1.2 GB), and the connection is closed.
    static let skippableFactor = 64

    /// The peer announced a frame so large that the connection is closed instead.
    struct FrameTooLarge: Error {
        var length: Int
        var limit: Int
    }

    /// The peer closed the connection in the middle of a frame.
    struct TruncatedFrame: Error {
        var bytes: Int
    }
}
