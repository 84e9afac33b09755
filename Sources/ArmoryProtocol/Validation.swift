/// MLflow's rules for keys and values, checked before anything is accepted
/// (MLflow 3.x `mlflow/utils/validation.py`).
public enum MLflowRules {
    public static let maxKeyLength = 250
    public static let maxParamValueLength = 6000
    public static let maxTagValueLength = 8000
    public static let maxExperimentTagValueLength = 20000
    public static let maxExperimentNameLength = 500

    /// What kind of key is being checked, for the error message.
    public enum KeyKind: String, Sendable {
        case metric, param, tag
    }

    /// Checks a metric, param or tag key; the error names the key and says how to fix it.
    public static func validateKey(_ key: String, kind: KeyKind) throws(ProtocolError) {
        if key.isEmpty {
            throw ProtocolError(.invalidKey, "Invalid \(kind.rawValue) key '': keys must not be empty.", key: key)
        }
        let length = key.unicodeScalars.count
        if length > maxKeyLength {
            throw ProtocolError(.invalidKey, "Invalid \(kind.rawValue) key '\(key.prefix(60))…': \(length) characters, MLflow allows at most \(maxKeyLength).", key: key)
        }
        for scalar in key.unicodeScalars where !isKeyScalar(scalar) {
            throw ProtocolError(
                .invalidKey, "Invalid \(kind.rawValue) key '\(key)': character '\(scalar.escaped(asASCII: true))' is not allowed. Keys may only contain alphanumerics, underscores (_), dashes (-), periods (.), spaces ( ), colons (:) and slashes (/).",
                key: key)
        }
        let normalized = posixNormalizedPath(key)
        if normalized != key || normalized == "." || normalized.hasPrefix("..") || normalized.hasPrefix("/") {
            throw ProtocolError(
                .invalidKey, "Invalid \(kind.rawValue) key '\(key)': keys are used as file paths and must not resolve to another name (this one resolves to '\(normalized)'): no leading '/', no '//', no '.' or '..' segments, no trailing '/'.",
                key: key)
        }
    }

    /// The check of `validateKey` for the keys nearly every client logs, without allocating:
    /// `true` only for a key of at most 250 ASCII letters, digits, `_`, `-`, `.`, space, `:` and
    /// `/` whose `/`-separated segments are neither empty nor `.` or `..`, not starting with `..`
    /// (such a key passes `validateKey`); `false` means "ask `validateKey`".
    public static func isPlainValidKey(_ key: String) -> Bool {
        if key.utf8.starts(with: "..".utf8) { return false }
        var length = 0
        var segment = 0  // bytes in the current segment
        var dots = 0  // of them, dots
        for c in key.utf8 {
            length += 1
            switch c {
            case UInt8(ascii: "/"):
                guard segment > 0, !(dots == segment && dots <= 2) else { return false }
                segment = 0
                dots = 0
                continue
            case UInt8(ascii: "."):
                dots += 1
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                UInt8(ascii: "_"), UInt8(ascii: "-"), UInt8(ascii: " "), UInt8(ascii: ":"):
                break
            default:
                return false
            }
            segment += 1
        }
        return length <= maxKeyLength && segment > 0 && !(dots == segment && dots <= 2)
    }

    public static func validateParamValue(_ value: String, key: String) throws(ProtocolError) {
        let length = value.unicodeScalars.count
        if length > maxParamValueLength {
            throw ProtocolError(.invalidValue, "Param '\(key)' has a value of \(length) characters; MLflow allows at most \(maxParamValueLength). Shorten it or log it as an artifact.", key: key)
        }
    }

    /// A run's tag value (`limit`: `maxExperimentTagValueLength` for an experiment's tag).
    public static func validateTagValue(_ value: String, key: String, limit: Int = maxTagValueLength) throws(ProtocolError) {
        let length = value.unicodeScalars.count
        if length > limit {
            throw ProtocolError(.invalidValue, "Tag '\(key)' has a value of \(length) characters; MLflow allows at most \(limit). Shorten it or log it as an artifact.", key: key)
        }
    }

    public static func validateExperimentName(_ name: String) throws(ProtocolError) {
        if name.isEmpty {
            throw ProtocolError(.invalidValue, "The evaluation name is empty: MLflow needs a non-empty experiment name.")
        }
        if name.unicodeScalars.count > maxExperimentNameLength {
            throw ProtocolError(.invalidValue, "The evaluation name has \(name.unicodeScalars.count) characters; MLflow allows at most \(maxExperimentNameLength).")
        }
    }

    public static func validateMetric(_ metric: MetricPoint) throws(ProtocolError) {
        try validateKey(metric.key, kind: .metric)
        if metric.timestamp < 0 {
            throw ProtocolError(.invalidValue, "Metric '\(metric.key)' has timestamp \(metric.timestamp); MLflow needs a non-negative time in milliseconds since the epoch.", key: metric.key)
        }
    }

    /// An artifact path stays inside its run: relative, normalised, no `..`.
    public static func validateArtifactPath(_ path: String) throws(ProtocolError) {
        guard !path.isEmpty, posixNormalizedPath(path) == path, !path.hasPrefix("/"), !path.hasPrefix("..") else {
            throw ProtocolError(.invalidValue, "Invalid artifact path '\(path)': use a relative path such as 'exports/00000/00/input.png', without '..' or '//'.")
        }
    }

    /// Python's `\w` (str patterns): letters, digits and other numerics, and the underscore.
    static func isKeyScalar(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar {
        case "a"..."z", "A"..."Z", "0"..."9", "_", "/", ".", "-", " ", ":": return true
        default:
            guard scalar.value >= 0x80 else { return false }
            switch scalar.properties.generalCategory {
            case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter,
                .decimalNumber, .letterNumber, .otherNumber:
                return true
            default:
                return false
            }
        }
    }

    /// Python's `posixpath.normpath`.
    public static func posixNormalizedPath(_ path: String) -> String {
        if path.isEmpty { return "." }
        var leadingSlashes = 0
        for c in path.utf8 { if c == UInt8(ascii: "/") { leadingSlashes += 1 } else { break } }
        let initial = leadingSlashes == 2 ? "//" : (leadingSlashes > 0 ? "/" : "")
        var parts: [Substring] = []
        for component in path.split(separator: "/", omittingEmptySubsequences: true) {
            if component == "." { continue }
            if component == ".." {
                if initial.isEmpty && (parts.isEmpty || parts.last == "..") {
                    parts.append(component)
                } else if !parts.isEmpty {
                    parts.removeLast()
                }
                continue
            }
            parts.append(component)
        }
        let joined = initial + parts.joined(separator: "/")
        return joined.isEmpty ? "." : joined
    }
}
