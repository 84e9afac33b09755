#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Standard base64 (RFC 4648, with padding), for artifact chunks.
public enum Base64 {
    public static func encode<C: Collection<UInt8>>(_ bytes: C) -> String {
        Data(bytes).base64EncodedString()
    }

    public static func decode(_ text: String) -> [UInt8]? {
        Data(base64Encoded: text).map { Array($0) }
    }
}
