import Foundation

/// How to authenticate to an MLflow server, resolved exactly as MLflow's own client does:
/// `MLFLOW_TRACKING_USERNAME`/`PASSWORD` (basic, wins), else `MLFLOW_TRACKING_TOKEN` (bearer),
/// else the `[mlflow]` section of `~/.mlflow/credentials`.
public struct MLflowCredentials: Sendable, Hashable, CustomStringConvertible {
    public var username: String?
    public var password: String?
    public var token: String?

    public init(username: String? = nil, password: String? = nil, token: String? = nil) {
        self.username = username
        self.password = password
        self.token = token
    }

    public var isEmpty: Bool { (username == nil || password == nil) && token == nil }

    /// The `Authorization` header value, if any.
    public var authorization: String? {
        if let username, let password {
            return "Basic " + Base64.encode(Array("\(username):\(password)".utf8))
        }
        if let token { return "Bearer " + token }
        return nil
    }

    /// Never prints a secret.
    public var description: String {
        if let username, password != nil { return "basic auth as \(username) (password redacted)" }
        if token != nil { return "bearer token (redacted)" }
        return "no credentials"
    }

    /// Resolves credentials MLflow's way (environment, then the credentials file), with systemd's
    /// credentials (`LoadCredential=mlflow-username|mlflow-password|mlflow-token`, read from
    /// `$CREDENTIALS_DIRECTORY`) between the two.
    public static func resolve(environment: [String: String], credentialsFile: String? = nil) -> MLflowCredentials {
        let file = credentialsFile ?? (environment["HOME"] ?? FileManager.default.homeDirectoryForCurrentUser.path) + "/.mlflow/credentials"
        let fromFile = parseCredentialsFile(file, section: "mlflow")
        let systemd = { (name: String) -> String? in
            guard let directory = nonEmpty(environment["CREDENTIALS_DIRECTORY"]),
                let text = try? String(contentsOfFile: directory + "/mlflow-" + name, encoding: .utf8)
            else { return nil }
            return nonEmpty(text.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        return MLflowCredentials(
            username: nonEmpty(environment["MLFLOW_TRACKING_USERNAME"]) ?? systemd("username") ?? fromFile["mlflow_tracking_username"],
            password: nonEmpty(environment["MLFLOW_TRACKING_PASSWORD"]) ?? systemd("password") ?? fromFile["mlflow_tracking_password"],
            token: nonEmpty(environment["MLFLOW_TRACKING_TOKEN"]) ?? systemd("token") ?? fromFile["mlflow_tracking_token"])
    }

    /// `key = value` lines of one `[section]` of an INI file (MLflow's credentials format).
    public static func parseCredentialsFile(_ path: String, section wanted: String) -> [String: String] {
        parseSections(path)[wanted] ?? [:]
    }

    /// Every `[section]` of an INI file with its `key = value` lines.
    public static func parseSections(_ path: String) -> [String: [String: String]] {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return [:] }
        var current = ""
        var out: [String: [String: String]] = [:]
        for raw in text.split(whereSeparator: \.isNewline) {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
            if line.hasPrefix("[") && line.hasSuffix("]") {
                current = String(line.dropFirst().dropLast()).trimmingCharacters(in: .whitespaces)
                continue
            }
            guard let separator = line.firstIndex(where: { $0 == "=" || $0 == ":" }) else { continue }
            let key = line[..<separator].trimmingCharacters(in: .whitespaces)
            let value = line[line.index(after: separator)...].trimmingCharacters(in: .whitespaces)
            out[current, default: [:]][key] = value
        }
        return out
    }

    static func nonEmpty(_ s: String?) -> String? { s.flatMap { $0.isEmpty ? nil : $0 } }
}

extension MLflowCredentials {
    /// The `credentials` member of `hello` (absent when there are none).
    public var json: JSONValue? {
        guard !isEmpty else { return nil }
        var o = JSONObject()
        if let username { o["username"] = .string(username) }
        if let password { o["password"] = .string(password) }
        if let token { o["token"] = .string(token) }
        return .object(o)
    }

    public init(json: JSONValue?) {
        self.init(username: json?["username"]?.stringValue, password: json?["password"]?.stringValue, token: json?["token"]?.stringValue)
    }
}
