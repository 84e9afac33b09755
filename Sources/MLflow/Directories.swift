#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Creates directories with errors in a user's terms: the path, what is wrong in words, and
/// which component is in the way.
public enum Directories {
    /// A directory that could not be created.
    public struct Failure: Error, CustomStringConvertible {
        public var path: String
        public var reason: String
        public var description: String { "Cannot create \(path): \(reason)" }
    }

    /// Creates `path` and its missing parents with `mode` (less the umask; existing ones are
    /// left as they are).
    public static func create(_ path: String, mode: mode_t = 0o777) throws(Failure) {
        do throws(Failure) {
            try make(path, mode: mode)
        } catch {
            throw Failure(path: path, reason: error.reason)
        }
    }

    private static func make(_ path: String, mode: mode_t) throws(Failure) {
        if mkdir(path, mode) == 0 { return }
        let code = errno
        if code == EEXIST || code == ENOTDIR {
            if isDirectory(path) { return }
            // The path, or one of its parents, is a file.
            var prefix = path.hasPrefix("/") ? "" : "."
            for component in path.split(separator: "/") {
                prefix += "/" + component
                if !isDirectory(prefix) { break }
            }
            throw Failure(path: path, reason: "\(prefix) is a file, not a directory. Remove it or choose another path.")
        }
        let parent = path.split(separator: "/").dropLast().joined(separator: "/")
        if code == ENOENT, !parent.isEmpty {
            try make((path.hasPrefix("/") ? "/" : "") + parent, mode: mode)
            if mkdir(path, mode) == 0 || isDirectory(path) { return }
        }
        throw Failure(path: path, reason: explain(errno, creating: path))
    }

    private static func isDirectory(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR
    }

    /// What `errno` means when creating `path`, and what to do about it.
    static func explain(_ code: Int32, creating path: String) -> String {
        let parent = path.split(separator: "/").dropLast().joined(separator: "/")
        let parentPath = (path.hasPrefix("/") ? "/" : "") + parent
        switch code {
        case EACCES, EPERM: return "permission denied: uid \(getuid()) may not write to \(parentPath.isEmpty ? "." : parentPath). Choose a directory you own."
        case EROFS: return "\(parentPath) is on a read-only file system. Choose a writable directory."
        case ENOSPC, EDQUOT: return "no space left on the device (or quota exceeded) under \(parentPath). Free some space."
        default: return String(cString: strerror(code)).lowercased() + "."
        }
    }
}
