import ArmoryProtocol
import Foundation

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

extension MLflowCredentials {
    /// The credentials of each server in a file of MLflow's credentials format whose sections are
    /// named by tracking URI (`[https://mlflow.lab:5000]`), keyed by `MLflowDestination.baseURL`:
    /// `/etc/armory/credentials`, `$ARMORY_HOME/credentials`.
    public static func perServer(file path: String) -> [String: MLflowCredentials] {
        var servers: [String: MLflowCredentials] = [:]
        for (section, values) in parseSections(path) where MLflowDestination.isRemote(section) {
            func value(_ key: String) -> String? { values[key].flatMap { $0.isEmpty ? nil : $0 } }
            let credentials = MLflowCredentials(username: value("mlflow_tracking_username"), password: value("mlflow_tracking_password"), token: value("mlflow_tracking_token"))
            if !credentials.isEmpty { servers[MLflowDestination(trackingURI: section).baseURL] = credentials }
        }
        return servers
    }
}
