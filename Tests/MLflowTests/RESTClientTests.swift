import ArmoryProtocol
import Foundation
import Testing

@testable import MLflow

@Suite struct CredentialsTests {
    let file: String = {
        let path = NSTemporaryDirectory() + "mlflow-credentials-" + UUID().uuidString
        try! """
        [other]
        mlflow_tracking_username = nope
        [mlflow]
        mlflow_tracking_username = file-user
        mlflow_tracking_password = file-pass
        """.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }()

    @Test func environmentWinsOverTheFile() {
        let c = MLflowCredentials.resolve(environment: ["MLFLOW_TRACKING_USERNAME": "env-user", "MLFLOW_TRACKING_PASSWORD": "env-pass"], credentialsFile: file)
        #expect(c.username == "env-user" && c.password == "env-pass")
        #expect(c.authorization == "Basic " + Data("env-user:env-pass".utf8).base64EncodedString())
    }

    @Test func theFilesMLflowSectionIsRead() {
        let c = MLflowCredentials.resolve(environment: [:], credentialsFile: file)
        #expect(c.username == "file-user" && c.password == "file-pass")
    }

    @Test func systemdCredentialsComeBetweenTheEnvironmentAndTheFile() throws {
        let directory = NSTemporaryDirectory() + "armory-credentials-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        try "secret-token\n".write(toFile: directory + "/mlflow-token", atomically: true, encoding: .utf8)
        try "unit-user".write(toFile: directory + "/mlflow-username", atomically: true, encoding: .utf8)
        let c = MLflowCredentials.resolve(environment: ["CREDENTIALS_DIRECTORY": directory, "MLFLOW_TRACKING_PASSWORD": "env-pass"], credentialsFile: file)
        #expect(c.token == "secret-token" && c.username == "unit-user" && c.password == "env-pass")
    }

    @Test func theDaemonsCredentialsFileHasOneSectionPerServer() throws {
        let path = NSTemporaryDirectory() + "armory-servers-" + UUID().uuidString
        try """
        [mlflow]
        mlflow_tracking_token = not-a-server
        [https://mlflow.lab.example/]
        mlflow_tracking_username = armory
        mlflow_tracking_password = rotated
        [http://127.0.0.1:5000]
        mlflow_tracking_token = t2
        [https://empty.example]
        """.write(toFile: path, atomically: true, encoding: .utf8)
        let servers = MLflowCredentials.perServer(file: path)
        #expect(
            servers == [
                "https://mlflow.lab.example": MLflowCredentials(username: "armory", password: "rotated"),
                "http://127.0.0.1:5000": MLflowCredentials(token: "t2"),
            ])
        #expect(MLflowCredentials.perServer(file: "/nonexistent").isEmpty)
    }

    @Test func basicAuthWinsOverAToken() {
        let c = MLflowCredentials.resolve(environment: ["MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p", "MLFLOW_TRACKING_TOKEN": "t"], credentialsFile: "/nonexistent")
        #expect(c.authorization?.hasPrefix("Basic ") == true)
        let token = MLflowCredentials.resolve(environment: ["MLFLOW_TRACKING_TOKEN": "t"], credentialsFile: "/nonexistent")
        #expect(token.authorization == "Bearer t")
    }

    @Test func secretsAreNeverPrinted() {
        let c = MLflowCredentials(username: "u", password: "hunter2", token: nil)
        let d = MLflowDestination(trackingURI: "https://u:hunter2@mlflow.lab:5000/", credentials: c)
        #expect(!"\(c)".contains("hunter2") && !"\(d)".contains("hunter2"))
        #expect(d.baseURL == "https://mlflow.lab:5000")
    }

    @Test func tlsSettingsFromTheEnvironment() {
        let tls = MLflowTLSSettings.resolve(environment: ["MLFLOW_TRACKING_INSECURE_TLS": "true", "MLFLOW_TRACKING_SERVER_CERT_PATH": "/ca.pem"])
        #expect(tls.insecure && tls.serverCertificatePath == "/ca.pem" && tls.clientCertificatePath == nil)
    }
}

@Suite struct MLflowErrorTests {
    @Test(arguments: [408, 429, 500, 501, 502, 503, 504, 507, 520, 599])
    func retryableStatuses(_ status: Int) {
        #expect(MLflowError.api(status: status, code: "X", message: "", retryAfter: nil).isRetryable)
        #expect(MLflowError.http(status: status, body: "", retryAfter: nil).isRetryable)
    }

    @Test(arguments: [400, 401, 403, 404, 409, 413])
    func permanentStatuses(_ status: Int) {
        #expect(!MLflowError.api(status: status, code: "X", message: "", retryAfter: nil).isRetryable)
    }

    @Test func connectionErrorsAreRetryable() {
        #expect(MLflowError.transport("connection refused").isRetryable)
        #expect(!MLflowError.refused("deleted").isRetryable)
    }

    @Test func authFailuresSayWhatToCheck() {
        #expect(MLflowError.http(status: 401, body: "You are not authenticated.", retryAfter: nil).description.contains("MLFLOW_TRACKING_USERNAME"))
    }

    @Test func retryAfterInSecondsOrAsADate() {
        #expect(MLflowRESTClient.parseRetryAfter("7") == 7)
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss 'GMT'"
        let inTen = formatter.string(from: Date().addingTimeInterval(10))
        let parsed = MLflowRESTClient.parseRetryAfter(inTen)
        #expect(parsed != nil && parsed! > 7 && parsed! <= 10)
        #expect(MLflowRESTClient.parseRetryAfter("soon") == nil)
    }
}
