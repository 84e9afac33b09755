import ArmoryProtocol

/// A parameter value, stringified the way Armory's Python code records it (`str(v)`), so that a
/// Swift and a Python evaluation with the same settings record the same text.
public enum ParamValue: Sendable, Equatable {
    case none
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case list([ParamValue])
    /// A nested mapping: flattened into `key/sub` params at the top level, as MLflow's loggers do.
    case dict([(String, ParamValue)])

    public static func == (a: ParamValue, b: ParamValue) -> Bool { a.text == b.text }

    /// Python's `str()` of the value.
    public var text: String {
        switch self {
        case .string(let s): s
        default: repr
        }
    }

    /// Python's `repr()` of the value (how it appears inside a list or dict).
    public var repr: String {
        switch self {
        case .none: "None"
        case .bool(let b): b ? "True" : "False"
        case .int(let i): String(i)
        case .double(let d): PythonFloat.repr(d)
        case .string(let s): Self.pythonStringRepr(s)
        case .list(let items): "[" + items.map(\.repr).joined(separator: ", ") + "]"
        case .dict(let pairs): "{" + pairs.map { Self.pythonStringRepr($0.0) + ": " + $0.1.repr }.joined(separator: ", ") + "}"
        }
    }

    /// The params this value records under `key`: one, or one per leaf of a nested dict.
    public func flattened(key: String) -> [(String, String)] {
        guard case .dict(let pairs) = self else { return [(key, text)] }
        return pairs.flatMap { $0.1.flattened(key: key + "/" + $0.0) }
    }

    static func pythonStringRepr(_ s: String) -> String {
        let quote: Character = s.contains("'") && !s.contains("\"") ? "\"" : "'"
        var out = String(quote)
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if Character(scalar) == quote {
                    out += "\\" + String(quote)
                } else if scalar.value < 0x20 || scalar.value == 0x7F {
                    let hex = String(scalar.value, radix: 16)
                    out += "\\x" + (hex.count < 2 ? "0" + hex : hex)
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        out.append(quote)
        return out
    }
}

extension ParamValue: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByFloatLiteral,
    ExpressibleByBooleanLiteral, ExpressibleByNilLiteral, ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral
{
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int64) { self = .int(value) }
    public init(floatLiteral value: Double) { self = .double(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(nilLiteral: ()) { self = .none }
    public init(arrayLiteral elements: ParamValue...) { self = .list(elements) }
    public init(dictionaryLiteral elements: (String, ParamValue)...) { self = .dict(elements) }
}

/// Anything that can be recorded as a parameter value.
public protocol ParamConvertible {
    var paramValue: ParamValue { get }
}

extension ParamValue: ParamConvertible { public var paramValue: ParamValue { self } }
extension String: ParamConvertible { public var paramValue: ParamValue { .string(self) } }
extension Substring: ParamConvertible { public var paramValue: ParamValue { .string(String(self)) } }
extension Bool: ParamConvertible { public var paramValue: ParamValue { .bool(self) } }
extension Int: ParamConvertible { public var paramValue: ParamValue { .int(Int64(self)) } }
extension Int32: ParamConvertible { public var paramValue: ParamValue { .int(Int64(self)) } }
extension Int64: ParamConvertible { public var paramValue: ParamValue { .int(self) } }
extension UInt: ParamConvertible { public var paramValue: ParamValue { .int(Int64(self)) } }
extension Double: ParamConvertible { public var paramValue: ParamValue { .double(self) } }
extension Float: ParamConvertible { public var paramValue: ParamValue { .double(Double(self)) } }
extension Optional: ParamConvertible where Wrapped: ParamConvertible {
    public var paramValue: ParamValue { self?.paramValue ?? .none }
}
extension Array: ParamConvertible where Element: ParamConvertible {
    public var paramValue: ParamValue { .list(map(\.paramValue)) }
}
