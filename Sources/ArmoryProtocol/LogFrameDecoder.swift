/// The hot path of `ClientFrame.decode`: a metrics-only `log` frame in exactly the form the client
/// libraries write — `{"op":"log","run":"…","metrics":[["key",value,step,timestamp],…],"seq":N}`,
/// no spaces, no escapes — decoded straight from the bytes, without a JSON tree. Anything else
/// (another order, params or tags, escapes, non-finite strings, a float step) returns nil and takes
/// the general path, which gives the same frame for everything this accepts (property-tested).
enum LogFrameDecoder {
    private static let head = Array(#"{"op":"log","run":""#.utf8)
    private static let metricsKey = Array(#","metrics":["#.utf8)
    private static let seqKey = Array(#"],"seq":"#.utf8)

    static func decode(_ payload: UnsafeRawBufferPointer) -> ClientFrame? {
        var s = Scanner(bytes: payload)
        guard s.skip(head), let run = s.stringBody(), s.skip(metricsKey) else { return nil }
        var metrics: [MetricPoint] = []
        if !s.peek(UInt8(ascii: "]")) {
            repeat {
                guard s.skip(UInt8(ascii: "[")), s.skip(UInt8(ascii: "\"")), let key = s.stringBody(), s.skip(UInt8(ascii: ",")),
                    let value = s.number(), s.skip(UInt8(ascii: ",")), let step = s.integer(), s.skip(UInt8(ascii: ",")),
                    let timestamp = s.integer(), s.skip(UInt8(ascii: "]"))
                else { return nil }
                metrics.append(MetricPoint(key: key, value: value, step: step, timestamp: timestamp))
            } while s.skip(UInt8(ascii: ","))
        }
        guard s.skip(seqKey), let seq = s.integer(), seq >= 1, s.skip(UInt8(ascii: "}")), s.atEnd else { return nil }
        return ClientFrame(seq: UInt64(seq), op: .log(run: run, batch: LogBatch(metrics: metrics)))
    }

    /// A cursor over the payload; every method consumes only on success.
    private struct Scanner {
        let bytes: UnsafeRawBufferPointer
        var index = 0

        var atEnd: Bool { index == bytes.count }

        func peek(_ byte: UInt8) -> Bool { index < bytes.count && bytes[index] == byte }

        mutating func skip(_ byte: UInt8) -> Bool {
            guard peek(byte) else { return false }
            index += 1
            return true
        }

        mutating func skip(_ literal: [UInt8]) -> Bool {
            guard bytes.count - index >= literal.count else { return false }
            for (offset, byte) in literal.enumerated() where bytes[index + offset] != byte { return false }
            index += literal.count
            return true
        }

        /// The rest of a string whose opening quote was consumed: plain characters only (no
        /// escape, no control character), valid UTF-8.
        mutating func stringBody() -> String? {
            var end = index
            while end < bytes.count {
                let byte = bytes[end]
                if byte == UInt8(ascii: "\"") { break }
                if byte == UInt8(ascii: "\\") || byte < 0x20 { return nil }
                end += 1
            }
            guard end < bytes.count, let text = String(validating: UnsafeRawBufferPointer(rebasing: bytes[index..<end]), as: UTF8.self) else {
                return nil
            }
            index = end + 1
            return text
        }

        /// A JSON number token: `(integer form, its text)`.
        private mutating func numberToken() -> (isInteger: Bool, text: String)? {
            let start = index
            var i = index
            func digits() -> Bool {
                let first = i
                while i < bytes.count, bytes[i] >= UInt8(ascii: "0"), bytes[i] <= UInt8(ascii: "9") { i += 1 }
                return i > first
            }
            if i < bytes.count, bytes[i] == UInt8(ascii: "-") { i += 1 }
            if i < bytes.count, bytes[i] == UInt8(ascii: "0") {
                i += 1
            } else if !digits() {
                return nil
            }
            var isInteger = true
            if i < bytes.count, bytes[i] == UInt8(ascii: ".") {
                isInteger = false
                i += 1
                guard digits() else { return nil }
            }
            if i < bytes.count, bytes[i] == UInt8(ascii: "e") || bytes[i] == UInt8(ascii: "E") {
                isInteger = false
                i += 1
                if i < bytes.count, bytes[i] == UInt8(ascii: "+") || bytes[i] == UInt8(ascii: "-") { i += 1 }
                guard digits() else { return nil }
            }
            index = i
            return (isInteger, String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<i]), as: UTF8.self))
        }

        /// A metric value as the general path reads it: an integer token as `Double(Int64)`, else `Double(text)`.
        mutating func number() -> Double? {
            let start = index
            guard let token = numberToken() else { return nil }
            if token.isInteger, let i = Int64(token.text) { return Double(i) }
            guard let d = Double(token.text) else {
                index = start
                return nil
            }
            return d
        }

        /// An integer token that fits an Int64 (a step, a timestamp, the seq).
        mutating func integer() -> Int64? {
            let start = index
            guard let token = numberToken(), token.isInteger, let i = Int64(token.text) else {
                index = start
                return nil
            }
            return i
        }
    }
}
