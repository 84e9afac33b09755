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
            return "Basic " + Data("\(username):\(password)".utf8).base64EncodedString()
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

    /// Resolves credentials from an environment and a credentials file, MLflow's way.
    public static func resolve(environment: [String: String], credentialsFile: String? = nil) -> MLflowCredentials {
        let file = credentialsFile ?? (environment["HOME"] ?? NSHomeDirectory()) + "/.mlflow/credentials"
        let fromFile = parseCredentialsFile(file, section: "mlflow")
        return MLflowCredentials(
            username: nonEmpty(environment["MLFLOW_TRACKING_USERNAME"]) ?? fromFile["mlflow_tracking_username"],
            password: nonEmpty(environment["MLFLOW_TRACKING_PASSWORD"]) ?? fromFile["mlflow_tracking_password"],
            token: nonEmpty(environment["MLFLOW_TRACKING_TOKEN"]) ?? fromFile["mlflow_tracking_token"])
    }

    /// `key = value` lines of one `[section]` of an INI file (MLflow's credentials format).
    public static func parseCredentialsFile(_ path: String, section wanted: String) -> [String: String] {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return [:] }
        var current = ""
        var out: [String: String] = [:]
        for raw in text.split(whereSeparator: \.isNewline) {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
            if line.hasPrefix("[") && line.hasSuffix("]") {
                current = String(line.dropFirst().dropLast()).trimmingCharacters(in: .whitespaces)
                continue
            }
            guard current == wanted, let separator = line.firstIndex(where: { $0 == "=" || $0 == ":" }) else { continue }
            let key = line[..<separator].trimmingCharacters(in: .whitespaces)
            let value = line[line.index(after: separator)...].trimmingCharacters(in: .whitespaces)
            out[key] = value
        }
        return out
    }

    private static func nonEmpty(_ s: String?) -> String? { s.flatMap { $0.isEmpty ? nil : $0 } }
}

/// TLS settings of MLflow's client: `MLFLOW_TRACKING_INSECURE_TLS`, `MLFLOW_TRACKING_SERVER_CERT_PATH`,
/// `MLFLOW_TRACKING_CLIENT_CERT_PATH` (a PEM with the certificate and its key).
public struct MLflowTLSSettings: Sendable, Hashable {
    public var insecure: Bool
    public var serverCertificatePath: String?
    public var clientCertificatePath: String?

    public init(insecure: Bool = false, serverCertificatePath: String? = nil, clientCertificatePath: String? = nil) {
        self.insecure = insecure
        self.serverCertificatePath = serverCertificatePath
        self.clientCertificatePath = clientCertificatePath
    }

    public static func resolve(environment: [String: String]) -> MLflowTLSSettings {
        MLflowTLSSettings(
            insecure: ["true", "1"].contains(environment["MLFLOW_TRACKING_INSECURE_TLS"]?.lowercased() ?? ""),
            serverCertificatePath: environment["MLFLOW_TRACKING_SERVER_CERT_PATH"].flatMap { $0.isEmpty ? nil : $0 },
            clientCertificatePath: environment["MLFLOW_TRACKING_CLIENT_CERT_PATH"].flatMap { $0.isEmpty ? nil : $0 })
    }
}

/// One MLflow tracking server to write to, with how to reach it.
public struct MLflowDestination: Sendable, Hashable, CustomStringConvertible {
    /// `http(s)://host[:port][/prefix]`, without user info or trailing slash.
    public var baseURL: String
    public var credentials: MLflowCredentials
    public var tls: MLflowTLSSettings

    public init(trackingURI: String, credentials: MLflowCredentials = MLflowCredentials(), tls: MLflowTLSSettings = MLflowTLSSettings()) {
        var uri = trackingURI
        while uri.hasSuffix("/") { uri.removeLast() }
        self.baseURL = Self.stripUserInfo(uri)
        self.credentials = credentials
        self.tls = tls
    }

    /// Whether a tracking URI names a REST server (vs a local store).
    public static func isRemote(_ uri: String) -> Bool {
        uri.hasPrefix("http://") || uri.hasPrefix("https://")
    }

    /// The URI with any `user:password@` removed (what may be logged or journaled).
    public static func stripUserInfo(_ uri: String) -> String {
        guard let scheme = uri.range(of: "://") else { return uri }
        let rest = uri[scheme.upperBound...]
        let hostEnd = rest.firstIndex(of: "/") ?? rest.endIndex
        guard let at = rest[..<hostEnd].lastIndex(of: "@") else { return uri }
        return String(uri[..<scheme.upperBound]) + String(rest[rest.index(after: at)...])
    }

    public var description: String { "\(baseURL) (\(credentials))" }
}
