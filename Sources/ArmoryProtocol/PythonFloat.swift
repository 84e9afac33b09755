/// Python's `repr(float)` (= `str(float)`): how MLflow's file store writes metric values and
/// how Armory's Python code stringifies float params, so both clients record the same text.
public enum PythonFloat {
    public static func repr(_ value: Double) -> String {
        if value.isNaN { return "nan" }
        if value.isInfinite { return value < 0 ? "-inf" : "inf" }
        if value == 0 { return value.sign == .minus ? "-0.0" : "0.0" }
        // Swift's description gives the shortest round-trip digits; re-lay them out Python's way.
        var text = Substring(value.description)
        var sign = ""
        if text.first == "-" {
            sign = "-"
            text = text.dropFirst()
        }
        var exponent = 0
        if let e = text.firstIndex(where: { $0 == "e" || $0 == "E" }) {
            exponent = Int(text[text.index(after: e)...])!
            text = text[..<e]
        }
        var digits: String
        var pointPosition: Int
        if let dot = text.firstIndex(of: ".") {
            let intPart = text[..<dot]
            let fracPart = text[text.index(after: dot)...]
            digits = String(intPart) + String(fracPart)
            pointPosition = intPart.count
        } else {
            digits = String(text)
            pointPosition = text.count
        }
        // Normalise: drop leading zeros (moving the point) and trailing zeros.
        while digits.first == "0" && digits.count > 1 {
            digits.removeFirst()
            pointPosition -= 1
        }
        while digits.last == "0" && digits.count > 1 { digits.removeLast() }
        let decpt = pointPosition + exponent  // value = 0.DIGITS × 10^decpt
        if decpt > 16 || decpt < -3 {
            var out = sign + String(digits.first!)
            if digits.count > 1 { out += "." + digits.dropFirst() }
            let e = decpt - 1
            out += e < 0 ? "e-" : "e+"
            let magnitude = String(abs(e))
            out += magnitude.count < 2 ? "0" + magnitude : magnitude
            return out
        }
        if decpt <= 0 {
            return sign + "0." + String(repeating: "0", count: -decpt) + digits
        }
        if decpt >= digits.count {
            return sign + digits + String(repeating: "0", count: decpt - digits.count) + ".0"
        }
        let split = digits.index(digits.startIndex, offsetBy: decpt)
        return sign + digits[..<split] + "." + digits[split...]
    }
}
