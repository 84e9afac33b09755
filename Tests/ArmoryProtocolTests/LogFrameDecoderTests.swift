import Testing

@testable import ArmoryProtocol

/// The hand-written `log` decoder against the general path (JSON tree + `decode(json:)`): the same
/// frame for everything it accepts, and nil for anything outside its exact form.
@Suite struct LogFrameDecoderTests {
    /// SplitMix64: reproducible random cases.
    struct Random {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
    }

    static func general(_ payload: [UInt8]) -> ClientFrame? {
        guard let json = try? JSONParser.parse(payload) else { return nil }
        return try? ClientFrame.decode(json: json, receivedAtMs: 7)
    }

    static func fast(_ payload: [UInt8]) -> ClientFrame? { payload.withUnsafeBytes { LogFrameDecoder.decode($0) } }

    static func value(_ r: inout Random) -> String {
        switch r.below(8) {
        case 0: return String(Int64(bitPattern: r.next()))
        case 1: return "12345678901234567890123"  // an integer past Int64: read as a double
        case 2: return "-0"
        case 3: return String(Double(r.below(1000)))  // "5.0"
        case 4: return "\(r.below(10))e\(r.below(40) - 20)"
        default:
            let d = Double(bitPattern: r.next())
            return d.isFinite ? d.description : "1.5E+3"
        }
    }

    static func key(_ r: inout Random) -> String {
        let pieces = ["loss", "acc/é", "a b", "x:y", "ü", "m-1", "_", "日本", "k.9"]
        return (0...r.below(3)).map { _ in pieces[r.below(pieces.count)] }.joined(separator: "/")
    }

    @Test func canonicalFramesDecodeExactlyAsTheGeneralPathDoes() {
        var r = Random(state: 42)
        for _ in 0..<3000 {
            let rows = (0..<r.below(5)).map { _ in
                "[\"\(Self.key(&r))\",\(Self.value(&r)),\(Int64(bitPattern: r.next()) >> r.below(63)),\(1_795_400_000_000 + r.below(1_000_000))]"
            }
            let text = #"{"op":"log","run":"h\#(r.below(1 << 20))","metrics":["# + rows.joined(separator: ",") + #"],"seq":\#(1 + r.below(1 << 30))}"#
            let payload = Array(text.utf8)
            let fast = Self.fast(payload)
            #expect(fast != nil, "declined: \(text)")
            #expect(fast == Self.general(payload), "differs: \(text)")
            if case .log(_, let batch)? = fast?.op, case .log(_, let other)? = Self.general(payload)?.op {
                #expect(zip(batch.metrics, other.metrics).allSatisfy { $0.value.bitPattern == $1.value.bitPattern })  // -0.0 and NaN bits too
            }
        }
    }

    @Test(arguments: [
        #"{"op":"log","run":"h","metrics":[["a",1,2,3]],"seq":1} "#,  // trailing space
        #"{"op": "log","run":"h","metrics":[["a",1,2,3]],"seq":1}"#,
        #"{"op":"log","run":"h\u0041","metrics":[["a",1,2,3]],"seq":1}"#,
        #"{"op":"log","run":"h","metrics":[["a\"b",1,2,3]],"seq":1}"#,
        #"{"op":"log","run":"h","metrics":[["a","NaN",2,3]],"seq":1}"#,
        #"{"op":"log","run":"h","metrics":[["a",1,2.5,3]],"seq":1}"#,
        #"{"op":"log","run":"h","metrics":[["a",1,2,3]],"seq":0}"#,
        #"{"op":"log","run":"h","metrics":[["a",1,2,3]],"params":{"p":"1"},"seq":1}"#,
        #"{"op":"log","run":"h","metrics":[["a",1]],"seq":1}"#,
        #"{"op":"log","run":"h","metrics":[["a",01,2,3]],"seq":1}"#,
        #"{"op":"log","run":"h","metrics":[["a",1.,2,3]],"seq":1}"#,
        #"{"op":"log","run":"h","metrics":[["a",1,2,3],],"seq":1}"#,
        #"{"op":"log","run":"h","metrics":[["a",1,2,99999999999999999999]],"seq":1}"#,
        #"{"op":"log","run":"h","metrics":[],"seq":1}"#,
        #"{"op":"log","run":"h","metrics":[["a",1,2,3]],"seq":1}x"#,
        #"{"op":"log","run":"h","metrics":[["a",-,2,3]],"seq":1}"#,
    ])
    func anythingElseIsLeftToTheGeneralPath(_ text: String) {
        let payload = Array(text.utf8)
        let fast = Self.fast(payload)
        #expect(fast == nil || fast == Self.general(payload), "\(text)")
    }

    @Test func theGeneralEncodersMetricFramesTakeTheFastPath() {
        let batch = LogBatch(metrics: (0..<100).map { MetricPoint(key: "m\($0)", value: Double($0) / 3, step: 7, timestamp: 1_795_400_000_000) })
        let frame = ClientFrame(seq: 9, op: .log(run: "h42", batch: batch))
        let payload = frame.json.serialized
        #expect(Self.fast(payload) == frame)
    }

    @Test func invalidUTF8IsDeclined() {
        var payload = Array(#"{"op":"log","run":"h","metrics":[["a"#.utf8)
        payload += [0xFF, 0xFE]
        payload += Array(#"",1,2,3]],"seq":1}"#.utf8)
        #expect(Self.fast(payload) == nil)
    }
}
