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

/// Reads `op` and `seq` out of bytes that are not a valid frame (broken JSON, or the head and
/// tail of a frame too large to read), so that the error can name the frame it answers.
public enum FramePeek {
    /// The first `"op": "<name>"` and `"seq": <n>` found in `bytes`, when there are.
    public static func opAndSeq(_ bytes: some Collection<UInt8>) -> (op: String?, seq: UInt64?) {
        let b = Array(bytes)
        var op: String?
        var seq: UInt64?
        var i = 0
        while i < b.count, op == nil || seq == nil {
            defer { i += 1 }
            guard b[i] == UInt8(ascii: "\"") else { continue }
            if op == nil, matches(b, at: i, "\"op\""), let start = valueStart(b, after: i + 4), b[start] == UInt8(ascii: "\"") {
                var end = start + 1
                while end < b.count, end - start <= 64, isNameByte(b[end]) { end += 1 }
                if end < b.count, b[end] == UInt8(ascii: "\""), end > start + 1 { op = String(decoding: b[(start + 1)..<end], as: UTF8.self) }
            } else if seq == nil, matches(b, at: i, "\"seq\""), let start = valueStart(b, after: i + 5) {
                var n: UInt64 = 0
                var end = start
                while end < b.count, end - start < 19, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b[end]) {
                    n = n * 10 + UInt64(b[end] - UInt8(ascii: "0"))
                    end += 1
                }
                if end > start, n > 0 { seq = n }
            }
        }
        return (op, seq)
    }

    private static func matches(_ b: [UInt8], at i: Int, _ token: StaticString) -> Bool {
        let count = token.utf8CodeUnitCount
        guard i + count <= b.count else { return false }
        return token.withUTF8Buffer { t in (0..<count).allSatisfy { b[i + $0] == t[$0] } }
    }

    /// The index of the value after `"name"` and its colon (whitespace skipped).
    private static func valueStart(_ b: [UInt8], after index: Int) -> Int? {
        var i = index
        while i < b.count, isSpace(b[i]) { i += 1 }
        guard i < b.count, b[i] == UInt8(ascii: ":") else { return nil }
        i += 1
        while i < b.count, isSpace(b[i]) { i += 1 }
        return i < b.count ? i : nil
    }

    private static func isSpace(_ c: UInt8) -> Bool { c == 0x20 || c == 0x09 || c == 0x0a || c == 0x0d }
    private static func isNameByte(_ c: UInt8) -> Bool {
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(c) || c == UInt8(ascii: "_")
    }
}
