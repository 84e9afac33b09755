import ArmoryProtocol

/// libFuzzer target: the JSON parser and the message decoder on arbitrary payloads. Whatever
/// parses must also survive a write and a second parse unchanged (compared as written, so NaN
/// compares equal to itself).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzMessages(_ start: UnsafeRawPointer, _ count: Int) -> CInt {
    let payload = Array(UnsafeRawBufferPointer(start: start, count: count))
    _ = try? ClientFrame.decode(payload: payload, receivedAtMs: 0)
    if let value = try? JSONParser.parse(payload) {
        var writer = JSONWriter()
        writer.write(value)
        guard let reparsed = try? JSONParser.parse(writer.bytes) else { preconditionFailure("the writer's JSON does not parse") }
        var again = JSONWriter()
        again.write(reparsed)
        precondition(again.bytes == writer.bytes, "JSON did not survive a write and a parse")
    }
    return 0
}
