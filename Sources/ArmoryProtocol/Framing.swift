/// The sizes every armoryd connection is held to; the daemon states its own in the `hello` reply.
public struct ProtocolLimits: Sendable, Equatable {
    /// The largest frame payload (the JSON object, without the 4-byte prefix) a peer may send.
    public var maxFrameBytes: Int
    /// The largest artifact chunk (raw bytes, before base64) a client should send.
    public var maxChunkBytes: Int
    /// Deepest JSON nesting accepted.
    public var maxDepth: Int

    public static let `default` = ProtocolLimits(maxFrameBytes: 8 << 20, maxChunkBytes: 1 << 20, maxDepth: 64)

    public init(maxFrameBytes: Int, maxChunkBytes: Int, maxDepth: Int) {
        self.maxFrameBytes = maxFrameBytes
        self.maxChunkBytes = maxChunkBytes
        self.maxDepth = maxDepth
    }
}

/// The protocol versions spoken by this build.
public enum ProtocolVersion {
    public static let current = 1
    public static let supported: ClosedRange<Int> = 1...1
}

/// Length-prefixed framing: a 4-byte big-endian unsigned length, then that many bytes of JSON.
public enum Frame {
    public static let headerSize = 4

    /// Prefixes `payload` with its length.
    public static func encode(_ payload: [UInt8]) -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(payload.count + headerSize)
        appendHeader(length: payload.count, to: &out)
        out.append(contentsOf: payload)
        return out
    }

    public static func appendHeader(length: Int, to out: inout [UInt8]) {
        let n = UInt32(length)
        out.append(UInt8(truncatingIfNeeded: n >> 24))
        out.append(UInt8(truncatingIfNeeded: n >> 16))
        out.append(UInt8(truncatingIfNeeded: n >> 8))
        out.append(UInt8(truncatingIfNeeded: n))
    }

    /// Overwrites the 4 header bytes at `offset` with `length`.
    public static func patchHeader(length: Int, in out: inout [UInt8], at offset: Int) {
        let n = UInt32(length)
        out[offset] = UInt8(truncatingIfNeeded: n >> 24)
        out[offset + 1] = UInt8(truncatingIfNeeded: n >> 16)
        out[offset + 2] = UInt8(truncatingIfNeeded: n >> 8)
        out[offset + 3] = UInt8(truncatingIfNeeded: n)
    }

    public static func readHeader<C: Collection<UInt8>>(_ bytes: C) -> Int where C.Index == Int {
        let s = bytes.startIndex
        return Int(bytes[s]) << 24 | Int(bytes[s + 1]) << 16 | Int(bytes[s + 2]) << 8 | Int(bytes[s + 3])
    }
}

/// Splits a byte stream into frames: feed it bytes, then take frames until it needs more.
///
/// A value type with no I/O, so the same logic serves the client library, the tests and the fuzzers.
public struct FrameDecoder: Sendable {
    /// What the decoder found next in the stream.
    public enum Next: Equatable, Sendable {
        case frame([UInt8])
        case needMoreData
        /// The peer announced a frame larger than the limit: the stream cannot be resynchronised.
        case tooLarge(length: Int)
    }

    public let maxFrameBytes: Int
    private var buffer: [UInt8] = []
    private var readIndex = 0

    public init(maxFrameBytes: Int = ProtocolLimits.default.maxFrameBytes) {
        self.maxFrameBytes = maxFrameBytes
    }

    /// Bytes received but not yet returned as a frame (a truncated frame at end of stream).
    public var bufferedByteCount: Int { buffer.count - readIndex }

    /// Those bytes (to hand a stream over to another decoder).
    public var remainingBytes: [UInt8] { Array(buffer[readIndex...]) }

    public mutating func feed<C: Collection<UInt8>>(_ bytes: C) {
        if readIndex > 0 && readIndex == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            readIndex = 0
        }
        buffer.append(contentsOf: bytes)
    }

    public mutating func next() -> Next {
        guard buffer.count - readIndex >= Frame.headerSize else { return .needMoreData }
        let length = Frame.readHeader(buffer[readIndex..<readIndex + 4])
        guard length <= maxFrameBytes else { return .tooLarge(length: length) }
        guard buffer.count - readIndex - Frame.headerSize >= length else { return .needMoreData }
        let start = readIndex + Frame.headerSize
        let frame = Array(buffer[start..<start + length])
        readIndex = start + length
        if readIndex > 65536 && readIndex * 2 > buffer.count {
            buffer.removeFirst(readIndex)
            readIndex = 0
        }
        return .frame(frame)
    }
}
