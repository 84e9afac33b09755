@testable import ArmoryDaemon
import ArmoryProtocol
import NIOCore
import NIOEmbedded

/// libFuzzer target: the daemon's frame decoder (NIO) and the clients' (`FrameDecoder`) fed the
/// same bytes in the same chunks must agree frame by frame, and every frame goes through the
/// message decoder. Any trap is a finding.
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
    var nioFailed = false
    var valueFailed = false
    var offset = bytes.startIndex
    while offset < bytes.endIndex {
        let piece = bytes[offset..<min(offset + chunk, bytes.endIndex)]
        offset = piece.endIndex
        if !nioFailed {
            do {
                try channel.writeInbound(channel.allocator.buffer(bytes: piece))
            } catch {
                nioFailed = true
            }
            // Frames decoded before an oversized one in the same chunk were passed on too.
            while let frame = try? channel.readInbound(as: ByteBuffer.self) { nioFrames.append(Array(frame.readableBytesView)) }
        }
        if !valueFailed {
            decoder.feed(piece)
            loop: while true {
                switch decoder.next() {
                case .frame(let payload): valueFrames.append(payload)
                case .needMoreData: break loop
                case .tooLarge: valueFailed = true; break loop
                }
            }
        }
    }
    precondition(nioFrames == valueFrames, "the two frame decoders disagree")
    precondition(nioFailed == valueFailed, "only one frame decoder refused an oversized frame")
    for frame in valueFrames { _ = try? ClientFrame.decode(payload: frame, receivedAtMs: 0) }
    _ = try? channel.finish()
    return 0
}
