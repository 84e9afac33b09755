import ArmoryProtocol
import Foundation
import Testing

/// Runs every vector of `proto/vectors.json` through the frame decoder and the message decoder.
@Suite struct VectorTests {
    struct Vector: CustomTestStringConvertible, Sendable {
        var name: String
        var frame: [UInt8]
        var expect: JSONObject
        var testDescription: String { name }
    }

    static let vectors: [Vector] = {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../proto/vectors.json")
        let data = try! Data(contentsOf: url)
        let doc = try! JSONParser.parse(Array(data))
        return doc["vectors"]!.arrayValue!.map { v in
            Vector(name: v["name"]!.stringValue!, frame: hexBytes(v["frame_hex"]!.stringValue!), expect: v["expect"]!.objectValue!)
        }
    }()

    static func hexBytes(_ hex: String) -> [UInt8] {
        var out: [UInt8] = []
        var index = hex.startIndex
        while index < hex.endIndex {
            let next = hex.index(index, offsetBy: 2)
            out.append(UInt8(hex[index..<next], radix: 16)!)
            index = next
        }
        return out
    }

    @Test func thereAreVectors() {
        #expect(Self.vectors.count >= 30)
    }

    @Test(arguments: vectors)
    func vector(_ vector: Vector) throws {
        var decoder = FrameDecoder()
        decoder.feed(vector.frame)
        let next = decoder.next()
        if let framing = vector.expect["framing"]?.stringValue {
            switch framing {
            case "too_large": #expect({ if case .tooLarge = next { true } else { false } }())
            case "need_more_data": #expect(next == .needMoreData)
            default: Issue.record("unknown framing expectation \(framing)")
            }
            return
        }
        guard case .frame(let payload) = next else {
            Issue.record("no frame decoded: \(next)")
            return
        }
        if let code = vector.expect["error"]?.stringValue {
            #expect(throws: ProtocolError.self) { try ClientFrame.decode(payload: payload, receivedAtMs: 0) }
            do {
                _ = try ClientFrame.decode(payload: payload, receivedAtMs: 0)
            } catch {
                #expect(error.code.rawValue == code)
                #expect(!error.message.isEmpty)
            }
            return
        }
        let frame = try ClientFrame.decode(payload: payload, receivedAtMs: 0)
        #expect(frame.op.name == vector.expect["op"]?.stringValue)
        // The names clients use to tell requests from fire-and-forget ops agree with the ops.
        #expect(ClientOp.requestNames.contains(frame.op.name) == frame.op.expectsReply)
        // Re-encoding gives a frame that decodes to the same op (the encoder and decoder agree).
        let again = try ClientFrame.decode(payload: frame.json.serialized, receivedAtMs: 0)
        #expect(again == frame)
        // Every expected field is in the re-encoded frame with the expected value.
        let encoded = frame.json
        for (key, value) in vector.expect["fields"]?.objectValue ?? [:] {
            #expect(normalized(encoded[key]) == normalized(value), "field \(key)")
        }
    }

    /// Numbers compare by value (1 == 1.0); non-finite numbers are spelled as MLflow's strings.
    func normalized(_ value: JSONValue?) -> JSONValue? {
        switch value {
        case .int(let i)?: return .double(Double(i))
        case .double(let d)?:
            if d.isNaN { return .string("NaN") }
            if d.isInfinite { return .string(d > 0 ? "Infinity" : "-Infinity") }
            return .double(d)
        case .array(let a)?: return .array(a.map { normalized($0)! })
        case .object(let o)?: return .object(o.mapValues { normalized($0)! })
        default: return value
        }
    }
}
