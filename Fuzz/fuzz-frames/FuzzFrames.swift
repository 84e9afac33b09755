import ArmoryProtocol
import NIOCore
import NIOEmbedded

@testable import ArmoryDaemon

/// libFuzzer target: the daemon's frame decoder (NIO) and the clients' (`FrameDecoder`) fed the
/// same bytes in the same chunks must agree frame by frame up to the first frame over the limit,
/// and every frame goes through the message decoder. Any trap is a finding.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzFrames(_ start: UnsafeRawPointer, _ count: Int) -> CInt {
    let input = Array(UnsafeRawBufferPointer(start: start, count: count))
    guard let first = input.first else { return 0 }
    let chunk = Int(first % 64) + 1
    let bytes = input.dropFirst()
    let limit = 4096

    let channel = EmbeddedChannel()
    try! channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameChannelDecoder(maxFrameBytes: limit)))
    var decoder = FrameDecoder(maxFrameBytes: limit)
    var nioFrames: [[UInt8]] = []
    var valueFrames: [[UInt8]] = []
    // Up to the first frame over the limit the two agree frame by frame; the daemon's decoder
    // then skips it (or closes the connection), the clients' stops.
    var nioStopped = false
    var valueStopped = false
    var offset = bytes.startIndex
    while offset < bytes.endIndex {
        let piece = bytes[offset..<min(offset + chunk, bytes.endIndex)]
        offset = piece.endIndex
        if !nioStopped {
            do {
                try channel.writeInbound(channel.allocator.buffer(bytes: piece))
            } catch {
                nioStopped = true
            }
            // Frames decoded before an oversized one in the same chunk were passed on too.
            while !nioStopped, let decoded = try? channel.readInbound(as: DecodedFrame.self) {
                switch decoded {
                case .frame(let frame): nioFrames.append(Array(frame.readableBytesView))
                case .tooLarge: nioStopped = true
                }
            }
        }
        if !valueStopped {
            decoder.feed(piece)
            loop: while true {
                switch decoder.next() {
                case .frame(let payload): valueFrames.append(payload)
                case .needMoreData: break loop
                case .tooLarge:
                    valueStopped = true
                    break loop
                }
            }
        }
    }
    precondition(nioFrames == valueFrames, "the two frame decoders disagree")
    for frame in valueFrames { _ = try? ClientFrame.decode(payload: frame, receivedAtMs: 0) }
    _ = try? channel.finish()
    return 0
}
