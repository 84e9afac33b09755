import ArmoryProtocol
import NIOCore
import NIOEmbedded
import Testing

@testable import ArmoryDaemon

/// The daemon's frame decoder without a socket: frames pass, a frame over the limit is skipped as
/// its bytes arrive and reported with its head and tail, and the frames after it carry on.
@Suite struct FrameChannelDecoderTests {
    static func frame(_ json: String) -> [UInt8] { Frame.encode(Array(json.utf8)) }

    func decode(_ chunks: [[UInt8]], limit: Int) throws -> [DecodedFrame] {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameChannelDecoder(maxFrameBytes: limit)))
        var out: [DecodedFrame] = []
        for chunk in chunks {
            try channel.writeInbound(channel.allocator.buffer(bytes: chunk))
            while let decoded = try channel.readInbound(as: DecodedFrame.self) { out.append(decoded) }
        }
        _ = try channel.finish()
        return out
    }

    @Test(arguments: [1, 7, 64, 100_000])
    func aFrameOverTheLimitIsSkippedAndTheNextOneIsRead(chunkSize: Int) throws {
        let big = #"{"op":"param","key":"k","value":""# + String(repeating: "x", count: 5000) + #"","seq":7}"#
        let bytes = Self.frame(#"{"op":"status","seq":6}"#) + Self.frame(big) + Self.frame(#"{"op":"status","seq":8}"#)
        let chunks = stride(from: 0, to: bytes.count, by: chunkSize).map { Array(bytes[$0..<min($0 + chunkSize, bytes.count)]) }
        let decoded = try decode(chunks, limit: 1024)
        #expect(decoded.count == 3)
        guard decoded.count == 3, case .frame(let first) = decoded[0], case .tooLarge(let length, let head, let tail) = decoded[1],
            case .frame(let last) = decoded[2]
        else {
            Issue.record("unexpected frames: \(decoded)")
            return
        }
        #expect(String(buffer: first) == #"{"op":"status","seq":6}"#)
        #expect(length == big.utf8.count)
        #expect(head.count == FrameChannelDecoder.peekBytes && tail.count == FrameChannelDecoder.peekBytes)
        let peeked = FramePeek.opAndSeq(head + [0x20] + tail)
        #expect(peeked.op == "param" && peeked.seq == 7)
        #expect(String(buffer: last) == #"{"op":"status","seq":8}"#)
    }

    @Test func aLengthFarBeyondTheLimitIsNotAnArmorydClientAndCloses() throws {
        // "GET " read as a length: 1.2 GB.
        #expect(throws: FrameChannelDecoder.FrameTooLarge.self) { try decode([Array("GET / HTTP/1.1\r\n".utf8)], limit: 1024) }
    }
}

@Suite struct FramePeekTests {
    @Test func readsOpAndSeqOutOfBrokenJSON() {
        #expect(FramePeek.opAndSeq(Array(#"{"op": "log", "run":"h1","metrics":[["a",1]],"seq" : 42"#.utf8)) == ("log", 42))
        #expect(FramePeek.opAndSeq(Array(#"{"seq":3,"op":"start","evaluation":}"#.utf8)) == ("start", 3))
        #expect(FramePeek.opAndSeq(Array("garbage".utf8)) == (nil, nil))
        // A key named like a member is not mistaken for it when its value is not a name or a number.
        #expect(FramePeek.opAndSeq(Array(#"{"key":"op","value":"x"}"#.utf8)) == (nil, nil))
    }
}
