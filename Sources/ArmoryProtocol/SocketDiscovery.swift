/// Where clients look for the daemon and where the daemon binds (docs/architecture.md, "Finding the daemon").
public enum SocketDiscovery {
    public static let systemPath = "/run/armory/armoryd.sock"

    /// The per-user path under `$XDG_RUNTIME_DIR`, if that is set.
    public static func userPath(environment: [String: String]) -> String? {
        guard let runtime = environment["XDG_RUNTIME_DIR"], !runtime.isEmpty else { return nil }
        return runtime + "/armory/armoryd.sock"
    }

    /// The ordered candidates a client tries: `$ARMORY_SOCKET` alone when set; else the user
    /// path when that file exists, then the system path.
    public static func clientCandidates(environment: [String: String], exists: (String) -> Bool) -> [String] {
        if let explicit = environment["ARMORY_SOCKET"], !explicit.isEmpty { return [explicit] }
        var candidates: [String] = []
        if let user = userPath(environment: environment), exists(user) { candidates.append(user) }
        candidates.append(systemPath)
        return candidates
    }

    /// Every path a client would consider (for "no daemon" messages).
    public static func describedCandidates(environment: [String: String]) -> [String] {
        if let explicit = environment["ARMORY_SOCKET"], !explicit.isEmpty { return [explicit] }
        return [userPath(environment: environment), systemPath].compactMap { $0 }
    }

    /// Where the daemon binds: `--socket`, else `$ARMORY_SOCKET`, else the user path for a
    /// normal user and the system path for root. `nil` when a normal user has no runtime dir.
    public static func daemonPath(flag: String?, environment: [String: String], isRoot: Bool) -> String? {
        if let flag, !flag.isEmpty { return flag }
        if let explicit = environment["ARMORY_SOCKET"], !explicit.isEmpty { return explicit }
        if isRoot { return systemPath }
        return userPath(environment: environment)
    }

    /// The message a client shows when no daemon answers.
    public static func notRunningMessage(tried: [String], reason: String) -> String {
        """
        No armoryd is listening (tried \(tried.joined(separator: ", ")): \(reason)).
        Start one with `systemctl --user start armoryd.socket` (or the system unit), or run `armoryd &`; \
        set ARMORY_SOCKET if it listens elsewhere.
        """
    }
}
