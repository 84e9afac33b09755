/// The few YAML scalars MLflow's `meta.yaml` files hold, written so that PyYAML's `safe_load`
/// reads back exactly the same string (quoted whenever a plain scalar could mean something else).
enum YAMLScalar {
    private static let keywords: Set<String> = [
        "y", "yes", "n", "no", "true", "false", "on", "off", "null", "~",
    ]

    static func quoted(_ s: String) -> String {
        if isPlainSafe(s) { return s }
        if s.unicodeScalars.allSatisfy({ $0.value >= 0x20 && $0.value != 0x7F && !(0x80...0x9F).contains($0.value) }) {
            return "'" + s.replacingOccurrences(of: "'", with: "''") + "'"
        }
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            case "\r": out += "\\r"
            default:
                if scalar.value < 0x20 || scalar.value == 0x7F || (0x80...0x9F).contains(scalar.value) {
                    out += "\\u" + String(repeating: "0", count: 4 - String(scalar.value, radix: 16).count) + String(scalar.value, radix: 16)
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }

    private static func isPlainSafe(_ s: String) -> Bool {
        // Hex ids with a letter other than 'e' (MLflow's run ids; '1e5' could read as a number) resolve to strings in PyYAML: MLflow writes them plain.
        if s.unicodeScalars.allSatisfy({ ("0"..."9").contains($0) || ("a"..."f").contains($0) }),
            s.unicodeScalars.contains(where: { ("a"..."d").contains($0) || $0 == "f" })
        {
            return true
        }
        guard let first = s.unicodeScalars.first, s.unicodeScalars.last != ":" else { return false }
        guard ("a"..."z").contains(first) || ("A"..."Z").contains(first) || first == "/" || first == "_" else { return false }
        guard !keywords.contains(s.lowercased()) else { return false }
        return s.unicodeScalars.allSatisfy { c in
            ("a"..."z").contains(c) || ("A"..."Z").contains(c) || ("0"..."9").contains(c)
                || c == "_" || c == "." || c == "/" || c == ":" || c == "-" || c == "+" || c == "~"
        }
    }
}
