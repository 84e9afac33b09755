import ArmoryProtocol
import Foundation
import Testing

/// Every input in the fuzzers' message corpus (seeds, and any crash that was found and added)
/// decodes to a frame or a clean error, and whatever parses survives a write and a parse.
@Suite struct FuzzCorpusTests {
    static let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fuzz/corpus/fuzz-messages").path

    @Test func theMessageCorpusDecodesOrFailsCleanly() throws {
        let names = try FileManager.default.contentsOfDirectory(atPath: Self.corpus)
        #expect(names.count >= 30)
        for name in names {
            let payload = Array(try #require(FileManager.default.contents(atPath: Self.corpus + "/" + name)))
            _ = try? ClientFrame.decode(payload: payload, receivedAtMs: 0)
            if let value = try? JSONParser.parse(payload) {
                var writer = JSONWriter()
                writer.write(value)
                var again = JSONWriter()
                again.write(try JSONParser.parse(writer.bytes))
                #expect(again.bytes == writer.bytes, "\(name)")
            }
        }
    }
}
