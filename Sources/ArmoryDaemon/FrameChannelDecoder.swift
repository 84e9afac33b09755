import ArmoryProtocol
import NIOCore

/// Splits the connection's bytes into frame payloads (4-byte big-endian length, then JSON).
/// A frame over the limit cannot be skipped safely, so it is an error that closes the connection.
struct FrameChannelDecoder: ByteToMessageDecoder {
    typealias InboundOut = ByteBuffer

    /// The peer announced a frame larger than the limit.
    struct FrameTooLarge: Error {
        var length: Int
        var limit: Int
    }

    let maxFrameBytes: Int

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return .needMoreData }
        guard Int(length) <= maxFrameBytes else { throw FrameTooLarge(length: Int(length), limit: maxFrameBytes) }
        guard buffer.readableBytes >= Frame.headerSize + Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: Frame.headerSize)
        context.fireChannelRead(wrapInboundOut(buffer.readSlice(length: Int(length))!))
        return .continue
    }

    mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        if buffer.readableBytes > 0 {
            throw TruncatedFrame(bytes: buffer.readableBytes)
        }
        return .needMoreData
    }

    /// The peer closed the connection in the middle of a frame.
    struct TruncatedFrame: Error {
        var bytes: Int
    }
}
