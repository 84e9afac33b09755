#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Writing whole buffers to files with POSIX calls: what the store, the journal and the
/// dead-letter files share.
public enum FileWrites {
    /// Writes all of `bytes` to `fd`, resuming after short writes and `EINTR`; returns the
    /// failure in words (`strerror`), or nil.
    public static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> String? {
        bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let n = write(fd, raw.baseAddress! + offset, raw.count - offset)
                if n < 0 {
                    if errno == EINTR { continue }
                    return String(cString: strerror(errno))
                }
                offset += n
            }
            return nil
        }
    }
}
