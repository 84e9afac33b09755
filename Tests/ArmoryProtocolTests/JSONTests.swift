import ArmoryProtocol
import Foundation
import Testing

@Suite struct JSONTests {
    @Test func parsesEveryKind() throws {
        let value = try JSONParser.parse(Array(#"{"a":null,"b":true,"c":false,"d":-12,"e":1.5e3,"f":"x\ny","g":[1,[2]],"h":{}}"#.utf8))
        #expect(value["a"] == .null)
        #expect(value["b"] == .bool(true))
        #expect(value["c"] == .bool(false))
        #expect(value["d"] == .int(-12))
        #expect(value["e"] == .double(1500))
        #expect(value["f"] == .string("x\ny"))
        #expect(value["g"] == .array([.int(1), .array([.int(2)])]))
        #expect(value["h"] == .object([:]))
    }

    @Test func keepsMemberOrderAndLastDuplicateWins() throws {
        let value = try JSONParser.parse(Array(#"{"z":1,"a":2,"z":3}"#.utf8))
        #expect(Array(value.objectValue!.keys) == ["z", "a"])
        #expect(value["z"] == .int(3))
    }

    @Test func acceptsPythonNonFiniteTokens() throws {
        let value = try JSONParser.parse(Array("[NaN, Infinity, -Infinity]".utf8))
        let numbers = value.arrayValue!.map { $0.doubleValue! }
        #expect(numbers[0].isNaN)
        #expect(numbers[1] == .infinity)
        #expect(numbers[2] == -.infinity)
    }

    @Test func largeIntegersStayExact() throws {
        #expect(try JSONParser.parse(Array("9007199254740993".utf8)) == .int(9_007_199_254_740_993))
        #expect(try JSONParser.parse(Array("-9223372036854775808".utf8)) == .int(.min))
        // Past Int64: a double.
        #expect(try JSONParser.parse(Array("18446744073709551616".utf8)) == .double(18_446_744_073_709_551_616))
    }

    @Test(arguments: [
        "", "{", "{\"a\"}", "{\"a\":}", "[1,]", "01", "1.", ".5", "-", "tru", "\"abc", "\"\\x\"", "\"\u{01}\"",
        "\"\\ud800\"", "{} {}", "nan", "+1", "[1 2]",
    ])
    func rejectsInvalidDocuments(_ text: String) {
        #expect(throws: JSONParseError.self) { try JSONParser.parse(Array(text.utf8)) }
    }

    @Test func rejectsInvalidUTF8() {
        #expect(throws: JSONParseError.self) { try JSONParser.parse([0x22, 0xC3, 0x28, 0x22]) }
        #expect(throws: JSONParseError.self) { try JSONParser.parse([0x22, 0x5C, 0x6E, 0xFF, 0x22]) }
    }

    @Test func limitsNesting() throws {
        let ok = String(repeating: "[", count: 64) + String(repeating: "]", count: 64)
        _ = try JSONParser.parse(Array(ok.utf8))
        let deep = String(repeating: "[", count: 65) + String(repeating: "]", count: 65)
        #expect(throws: JSONParseError.self) { try JSONParser.parse(Array(deep.utf8)) }
    }

    /// The hand-written codec agrees with Foundation's on what both accept.
    @Test func agreesWithFoundation() throws {
        let samples: [String] = [
            #"{"op":"log","seq":12,"run":"h1","metrics":[["loss",0.5,3,1795400000000],["acc",1e-300,0,0]]}"#,
            #"{"s":"caf\u00e9 \ud83d\ude00 \"q\" \\ \/ \b\f\n\r\t","n":[0,-0.0,1.25,-3e10,123456789012]}"#,
            #"[true,false,null,{"a":{"b":{"c":[]}}}]"#,
        ]
        for sample in samples {
            let ours = try JSONParser.parse(Array(sample.utf8))
            let foundation = try JSONSerialization.jsonObject(with: Data(sample.utf8), options: [.fragmentsAllowed])
            #expect(Self.equal(ours, foundation), "\(sample)")
            // Our writer's output reads back the same with both parsers.
            let written = ours.serialized
            #expect(try JSONParser.parse(written) == ours)
            let reread = try JSONSerialization.jsonObject(with: Data(written), options: [.fragmentsAllowed])
            #expect(Self.equal(ours, reread))
        }
    }

    @Test func writerEscapesControlCharactersAndQuotes() throws {
        let text = "a\"b\\c\u{0}\u{1f}\n\té😀"
        let bytes = JSONValue.string(text).serialized
        #expect(String(decoding: bytes, as: UTF8.self) == #""a\"b\\c\u0000\u001f\n\té😀""#)
        #expect(try JSONParser.parse(bytes) == .string(text))
    }

    @Test func writerSpellsNonFiniteAsMLflowStrings() {
        #expect(JSONValue.array([.double(.nan), .double(.infinity), .double(-.infinity)]).serialized == Array(#"["NaN","Infinity","-Infinity"]"#.utf8))
    }

    static func equal(_ ours: JSONValue, _ theirs: Any) -> Bool {
        switch ours {
        case .null: return theirs is NSNull
        case .bool(let b): return (theirs as? Bool) == b
        case .int(let i): return (theirs as? NSNumber)?.int64Value == i
        case .double(let d): return (theirs as? NSNumber)?.doubleValue == d
        case .string(let s): return theirs as? String == s
        case .array(let a):
            guard let t = theirs as? [Any], t.count == a.count else { return false }
            return zip(a, t).allSatisfy { equal($0, $1) }
        case .object(let o):
            guard let t = theirs as? [String: Any], t.count == o.count else { return false }
            return o.allSatisfy { key, value in t[key].map { equal(value, $0) } ?? false }
        }
    }
}

@Suite struct FrameDecoderTests {
    @Test func reassemblesFramesSplitAnywhere() {
        let payloads: [[UInt8]] = [Array("{\"a\":1}".utf8), Array("{}".utf8), Array(repeating: 0x20, count: 70_000)]
        let stream = payloads.flatMap(Frame.encode)
        for chunkSize in [1, 3, 7, 4096, stream.count] {
            var decoder = FrameDecoder()
            var received: [[UInt8]] = []
            var offset = 0
            while offset < stream.count {
                let end = min(stream.count, offset + chunkSize)
                decoder.feed(stream[offset..<end])
                offset = end
                while case .frame(let f) = decoder.next() { received.append(f) }
            }
            #expect(received == payloads, "chunk size \(chunkSize)")
            #expect(decoder.bufferedByteCount == 0)
        }
    }

    @Test func refusesFramesOverTheLimit() {
        var decoder = FrameDecoder(maxFrameBytes: 10)
        decoder.feed(Frame.encode(Array(repeating: 0x20, count: 11)))
        #expect(decoder.next() == .tooLarge(length: 11))
    }

    @Test func keepsATruncatedFrameBuffered() {
        var decoder = FrameDecoder()
        decoder.feed([0, 0, 0, 10, 0x7B])
        #expect(decoder.next() == .needMoreData)
        #expect(decoder.bufferedByteCount == 5)
    }

    @Test func emptyPayloadIsAFrame() {
        var decoder = FrameDecoder()
        decoder.feed([0, 0, 0, 0])
        #expect(decoder.next() == .frame([]))
    }
}
