@testable import ArmoryDaemon

/// libFuzzer target: scanning a journal segment (what recovery does with whatever a crash or a
/// bad disk left) never traps, and what it accepts re-encodes to the same records.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzJournal(_ start: UnsafeRawPointer, _ count: Int) -> CInt {
    let bytes = JournalSegment.magic + Array(UnsafeRawBufferPointer(start: start, count: count))
    let scan = JournalSegment.scan(bytes)
    precondition(scan.validLength + scan.tornBytes == bytes.count)
    var again = JournalSegment.magic
    for (lsn, entry) in scan.entries {
        var w = JournalWriter()
        JournalCodec.encode(entry, into: &w)
        JournalSegment.frame(lsn: lsn, body: w.bytes, into: &again)
    }
    precondition(JournalSegment.scan(again).entries.map(\.entry) == scan.entries.map(\.entry), "a scanned record did not re-encode")
    return 0
}
