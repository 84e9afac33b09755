import ArgumentParser
import Configuration
import Foundation
import MLflow
import SystemPackage
import Yams

/// A configuration that cannot be used: the message names the setting and where it came from.
struct ConfigurationError: Error, CustomStringConvertible {
    var description: String

    init(_ description: String) { self.description = description }
}

/// Reads armoryd's settings with a stated precedence: a flag, else the environment
/// (`ARMORY_<SETTING>`, e.g. `ARMORY_FLUSH_INTERVAL`), else the configuration file (YAML, the
/// flags' names as keys), else the built-in default. Records where each value came from.
struct SettingsResolver {
    /// The settings a configuration file may hold: the flags' names.
    static let known: Set<String> = [
        "socket", "home", "tracking-uri", "max-frame-bytes", "orphan-grace", "shutdown-drain", "upload-concurrency",
        "flush-interval", "request-timeout", "journal-commit-ms", "journal-fsync", "max-backlog-bytes",
        "memory-backlog-bytes", "socket-mode", "max-connections", "log-level", "system-metrics-interval",
        "max-destinations-per-user", "admin-group",
    ]

    /// One resolved setting, for `--check-config`.
    struct Resolved: Equatable {
        var key: String
        var value: String
        var source: String
    }

    let filePath: String?
    private let file: ConfigReader?
    private let environment: ConfigReader
    private let environmentValues: [String: String]
    private(set) var resolved: [Resolved] = []

    /// The default file: /etc/armory/armoryd.conf for root, else $XDG_CONFIG_HOME/armory/armoryd.conf.
    static func defaultFile(environment: [String: String], isRoot: Bool) -> String {
        if isRoot { return "/etc/armory/armoryd.conf" }
        let base = environment["XDG_CONFIG_HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? (NSHomeDirectory() + "/.config")
        return base + "/armory/armoryd.conf"
    }

    /// Opens the file (`explicit`: it must exist; the default file may be missing) and checks
    /// that it names only known settings.
    static func open(explicit: String?, environment: [String: String], isRoot: Bool) async throws -> SettingsResolver {
        let path = explicit ?? defaultFile(environment: environment, isRoot: isRoot)
        var file: ConfigReader?
        if FileManager.default.fileExists(atPath: path) {
            let text: String
            do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
                throw ConfigurationError("Cannot read the configuration file \(path): \(error.localizedDescription)")
            }
            try checkKeys(text, path: path)
            do {
                file = ConfigReader(provider: try await FileProvider<YAMLSnapshot>(filePath: FilePath(path)))
            } catch {
                throw ConfigurationError("The configuration file \(path) is not valid YAML: \(error)")
            }
        } else if explicit != nil {
            throw ConfigurationError("The configuration file \(path) does not exist (--config).")
        }
        return SettingsResolver(filePath: file == nil ? nil : path, file: file, environment: environment)
    }

    private init(filePath: String?, file: ConfigReader?, environment: [String: String]) {
        self.filePath = filePath
        self.file = file
        self.environment = ConfigReader(provider: EnvironmentVariablesProvider(environmentVariables: environment).prefixKeys(with: "armory"))
        environmentValues = environment
    }

    /// A file holds one mapping of known settings to scalars; anything else is an error naming it.
    static func checkKeys(_ text: String, path: String) throws {
        let node: Node?
        do { node = try Yams.compose(yaml: text) } catch {
            throw ConfigurationError("The configuration file \(path) is not valid YAML: \(error)")
        }
        guard let node else { return }  // empty file
        guard let mapping = node.mapping else {
            throw ConfigurationError("The configuration file \(path) must be a mapping of settings (`flush-interval: 1`), one per line.")
        }
        for (key, value) in mapping {
            let name = key.string ?? "\(key)"
            guard known.contains(name) else {
                throw ConfigurationError("Unknown setting '\(name)' in \(path) (line \(key.mark?.line ?? 0)); settings are: \(known.sorted().joined(separator: ", ")).")
            }
            guard value.scalar != nil else {
                throw ConfigurationError("Setting '\(name)' in \(path) (line \(key.mark?.line ?? 0)) must be a single value, not a list or a mapping.")
            }
        }
    }

    /// The environment variable of a setting.
    static func environmentName(_ key: String) -> String { "ARMORY_" + key.uppercased().replacingOccurrences(of: "-", with: "_") }

    /// A setting's value: the flag, else the environment, else the file, else `defaultValue`.
    /// `also` names other environment variables that set it (after `ARMORY_…`).
    mutating func value<Value>(
        _ key: String, flag: Value?, default defaultValue: Value?, what: String, also: [String] = [],
        _ parse: (String) -> Value?
    ) throws -> Value? {
        if let flag {
            resolved.append(Resolved(key: key, value: Self.shown(key, "\(flag)"), source: "flag --\(key)"))
            return flag
        }
        var candidates: [(String?, String)] = [(environment.string(forKey: ConfigKey(key)), "environment \(Self.environmentName(key))")]
        for name in also { candidates.append((environmentValues[name].flatMap { $0.isEmpty ? nil : $0 }, "environment \(name)")) }
        candidates.append((file?.string(forKey: ConfigKey(key)), "file \(filePath ?? "")"))
        for case (let text?, let source) in candidates {
            guard let value = parse(text) else {
                throw ConfigurationError("Setting '\(key)' (\(source)): '\(Self.shown(key, text))' is not \(what).")
            }
            resolved.append(Resolved(key: key, value: Self.shown(key, text), source: source))
            return value
        }
        resolved.append(Resolved(key: key, value: defaultValue.map { "\($0)" } ?? "(none)", source: "default"))
        return defaultValue
    }

    /// Records a value that came from elsewhere (the socket systemd passed), and returns it.
    mutating func record(_ key: String, _ value: String, source: String) -> String {
        resolved.append(Resolved(key: key, value: value, source: source))
        return value
    }

    /// `value` for settings that always have a default.
    mutating func value<Value>(
        _ key: String, flag: Value?, default defaultValue: Value, what: String, also: [String] = [],
        _ parse: (String) -> Value?
    ) throws -> Value {
        try value(key, flag: flag, default: Optional(defaultValue), what: what, also: also, parse)!
    }

    /// A value as it may be printed: a tracking URI without its user info (credentials).
    static func shown(_ key: String, _ text: String) -> String {
        key == "tracking-uri" ? MLflowDestination.stripUserInfo(text) : text
    }

    /// What `--check-config` prints.
    var report: String {
        let width = resolved.map(\.key.count).max() ?? 0
        let header = "configuration file: " + (filePath ?? "none")
        return ([header] + resolved.map { $0.key.padding(toLength: width, withPad: " ", startingAt: 0) + "  " + $0.value + "  (" + $0.source + ")" })
            .joined(separator: "\n")
    }
}
