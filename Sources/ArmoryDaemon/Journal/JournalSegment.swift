/// The on-disk form of journal segments: an 8-byte magic, then records, each
/// `[u32 length][u32 CRC-32C][u64 sequence number][entry]` (length and checksum cover the
/// sequence number and the entry). Scanning is a pure function of the bytes.
enum JournalSegment {
    static let magic: [UInt8] = Array("ARMJRNL1".utf8)
    static let recordHeader = 8
    /// A record longer than this is a corrupt length field, not a record.
    static let maxRecordBytes = 256 << 20

    /// What a scan of one segment found.
    struct Scan {
        /// Filled only by `scan(_:)` without a visitor.
        var entries: [(lsn: UInt64, entry: JournalEntry)] = []
        /// Bytes up to the end of the last whole record: a torn tail starts here.
        var validLength = 0
        /// Records whose checksum or body was bad, skipped.
        var corrupt = 0
        /// Bytes after the last whole record that do not form one (a write cut short).
        var tornBytes = 0
    }

    /// Appends one framed record to `out` (in place: no intermediate copy).
    static func frame(lsn: UInt64, body: [UInt8], into out: inout [UInt8]) {
        let start = out.count
        out.reserveCapacity(start + recordHeader + 8 + body.count)
        withUnsafeBytes(of: UInt32(8 + body.count).littleEndian) { out.append(contentsOf: $0) }
        withUnsafeBytes(of: UInt32(0)) { out.append(contentsOf: $0) }  // the checksum, below
        withUnsafeBytes(of: lsn.littleEndian) { out.append(contentsOf: $0) }
        out.append(contentsOf: body)
        let checksum = out.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[(start + recordHeader)...])) }
        withUnsafeBytes(of: checksum.littleEndian) { raw in
            for i in 0..<4 { out[start + 4 + i] = raw[i] }
        }
    }

    /// Reads every record of a segment into `Scan.entries`.
    static func scan(_ bytes: [UInt8]) -> Scan {
        var entries: [(lsn: UInt64, entry: JournalEntry)] = []
        var scan = scan(bytes) { entries.append(($0, $1)) }
        scan.entries = entries
        return scan
    }

    /// Reads every record of a segment, handing each to `visit` in order. A bad checksum followed
    /// by more data is a corrupt record (skipped, counted); one at the very end is a torn tail (a
    /// write the crash cut short).
    static func scan(_ bytes: [UInt8], visit: (UInt64, JournalEntry) -> Void) -> Scan {
        var scan = Scan()
        guard bytes.count >= magic.count, Array(bytes[0..<magic.count]) == magic else {
            scan.tornBytes = bytes.count
            return scan
        }
        var offset = magic.count
        scan.validLength = offset
        bytes.withUnsafeBytes { raw in
            while offset < raw.count {
                guard raw.count - offset >= recordHeader else { break }
                let length = Int(UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: offset, as: UInt32.self)))
                let checksum = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: offset + 4, as: UInt32.self))
                guard length >= 9, length <= maxRecordBytes else {
                    // The length itself is damaged: nothing after it can be framed.
                    if offset + recordHeader < raw.count { scan.corrupt += 1 }
                    break
                }
                guard raw.count - offset - recordHeader >= length else { break }  // cut short
                let body = UnsafeRawBufferPointer(rebasing: raw[(offset + recordHeader)..<(offset + recordHeader + length)])
                let next = offset + recordHeader + length
                if CRC32C.checksum(body) == checksum {
                    var reader = JournalFieldReader(body)
                    if let lsn = try? reader.u64(), let entry = try? JournalCodec.decode(&reader), reader.remaining == 0 {
                        visit(lsn, entry)
                    } else {
                        scan.corrupt += 1
                    }
                    scan.validLength = next
                } else if next >= raw.count {
                    break  // the last record, damaged: a torn write
                } else {
                    scan.corrupt += 1
                    scan.validLength = next
                }
                offset = next
            }
        }
        scan.tornBytes = bytes.count - scan.validLength
        return scan
    }
}
