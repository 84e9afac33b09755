import CSystemd
import Foundation

/// Sockets passed by systemd's socket activation (`sd_listen_fds_with_names`).
public enum SocketActivation {
    /// A listening socket handed over by the service manager, with its `FileDescriptorName=`.
    public struct ListeningSocket: Sendable, Equatable {
        public var descriptor: Int32
        public var name: String
    }

    /// The passed sockets (`$LISTEN_FDS` for this pid), marked close-on-exec; the environment
    /// variables are unset, so that children do not inherit them.
    public static func listeningSockets() -> [ListeningSocket] {
        var names: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?
        let count = sd_listen_fds_with_names(1, &names)
        guard count > 0 else { return [] }
        defer {
            for i in 0..<Int(count) { free(names?[i]) }
            free(names)
        }
        return (0..<count).map { i in
            let fd = SD_LISTEN_FDS_START + i
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            return ListeningSocket(descriptor: fd, name: names?[Int(i)].map { String(cString: $0) } ?? "unknown")
        }
    }

    /// Whether `descriptor` is a listening Unix stream socket (what armoryd can adopt).
    public static func isListeningUnixStream(_ descriptor: Int32) -> Bool {
        sd_is_socket_unix(descriptor, Int32(SOCK_STREAM.rawValue), 1, nil, 0) > 0
    }

    /// The filesystem path a Unix socket is bound to, if any.
    public static func boundPath(_ descriptor: Int32) -> String? {
        var address = sockaddr_un()
        var length = socklen_t(MemoryLayout<sockaddr_un>.size)
        let result = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(descriptor, $0, &length) }
        }
        guard result == 0, address.sun_family == sa_family_t(AF_UNIX) else { return nil }
        return withUnsafeBytes(of: &address.sun_path) { raw in
            let bytes = raw.prefix(max(0, Int(length) - MemoryLayout<sa_family_t>.size)).prefix { $0 != 0 }
            return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self)
        }
    }
}
