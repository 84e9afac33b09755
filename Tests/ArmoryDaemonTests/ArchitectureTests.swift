import Foundation
import Testing

/// The rule of docs/architecture.md, "The pipeline", checked on the sources: calls go down the
/// pipeline (handler → session → uploader → journal and sink), and nothing below names what is
/// above it. A scan of the type names each file uses (comments left out).
struct ArchitectureTests {
    /// `Sources/ArmoryDaemon`, found from this file.
    private static let daemon = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Sources/ArmoryDaemon").path

    /// The type names a source file uses outside its comments.
    private static func names(in path: String) throws -> Set<String> {
        let text = try String(contentsOfFile: daemon + "/" + path, encoding: .utf8)
        let code = text.split(separator: "\n").map { line in line.range(of: "//").map { line[..<$0.lowerBound] } ?? line[...] }.joined(separator: "\n")
        return Set(code.split { !$0.isLetter && !$0.isNumber && $0 != "_" }.map(String.init).filter { $0.first?.isUppercase == true })
    }

    private static func files(in folder: String) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: daemon + "/" + folder).filter { $0.hasSuffix(".swift") }.map { folder + "/" + $0 }
    }

    /// What lives above each layer: a file of the layer must not name it.
    private static let sessions: Set<String> = ["Session", "SessionStateMachine", "SessionChannelHandler", "SessionTable", "SessionAction", "SessionCommit", "DaemonServices", "StatusReport", "Daemon"]
    private static let senders: Set<String> = sessions.union(["Uploader", "UploadScheduler", "Destinations", "DeadLetterFile", "RunRegistry"])
    private static let journal: Set<String> = senders.union(["RecordSink", "RESTSink", "FileStoreSink", "SinkFactory"])

    @Test func theJournalNamesNothingAboveIt() throws {
        for file in try Self.files(in: "Journal") {
            let above = try Self.names(in: file).intersection(Self.journal)
            #expect(above.isEmpty, "\(file) names \(above.sorted())")
        }
    }

    @Test func sinksNameNeitherTheUploaderNorTheJournalNorSessions() throws {
        for file in ["Sink.swift", "RESTSink.swift"] {
            let above = try Self.names(in: file).intersection(Self.senders.union(["Journal", "JournalEntry"]))
            #expect(above.isEmpty, "\(file) names \(above.sorted())")
        }
    }

    @Test func theUploadersNameNoSessionAndNoSyncJob() throws {
        for file in ["Uploader.swift", "UploadScheduler.swift", "DeadLetters.swift", "Destinations.swift", "RunRegistry.swift"] {
            let above = try Self.names(in: file).intersection(Self.sessions.union(["SyncJob", "SyncRunPlan", "SyncRequest"]))
            #expect(above.isEmpty, "\(file) names \(above.sorted())")
        }
    }

    @Test func theSchedulerIsAStateMachineWithoutIO() throws {
        let used = try Self.names(in: "UploadScheduler.swift")
        #expect(used.isDisjoint(with: ["Uploader", "Journal", "RecordSink", "Task", "EventLoop", "Mutex"]), "\(used.sorted())")
        let session = try Self.names(in: "Sessions/SessionStateMachine.swift")
        #expect(session.isDisjoint(with: ["Uploader", "Journal", "RecordSink", "Destinations", "DaemonServices", "Task", "EventLoop", "Channel"]), "\(session.sorted())")
    }
}
