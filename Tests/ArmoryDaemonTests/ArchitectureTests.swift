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
    private static let uploads: Set<String> = sessions.union(["Uploader", "JournalWriter", "Sender", "SenderStateMachine", "UploadScheduler", "Destinations", "DeadLetterFile", "RunRegistry"])
    private static let journal: Set<String> = uploads.union(["RecordSink", "RESTSink", "FileStoreSink", "SinkFactory"])
    private static let syncs: Set<String> = ["SyncJob", "SyncJobs", "SyncRunPlan", "SyncRequest", "SyncTags", "SyncDestination", "SyncedRunLookup", "SyncDestinationReader"]

    @Test func everyFolderIsABoxOfTheDiagramAndEveryBoxAFolder() throws {
        let doc = try String(contentsOfFile: Self.daemon + "/../../docs/architecture.md", encoding: .utf8)
        let diagram = try #require(doc.components(separatedBy: "```").dropFirst().first)
        let boxes = Set(diagram.split { !$0.isLetter && !$0.isNumber && $0 != "/" }.filter { $0.count > 1 && $0.first!.isLetter && $0.hasSuffix("/") }.map { String($0.dropLast()) })
        let folders = Set(
            try FileManager.default.contentsOfDirectory(atPath: Self.daemon).filter { name in
                var isDirectory: ObjCBool = false
                return FileManager.default.fileExists(atPath: Self.daemon + "/" + name, isDirectory: &isDirectory) && isDirectory.boolValue
            })
        #expect(boxes == folders, "diagram: \(boxes.sorted()), folders: \(folders.sorted())")
    }

    @Test func theJournalNamesNothingAboveIt() throws {
        for file in try Self.files(in: "Journal") {
            let above = try Self.names(in: file).intersection(Self.journal)
            #expect(above.isEmpty, "\(file) names \(above.sorted())")
        }
    }

    @Test func sinksNameNeitherTheUploadsNorTheJournalNorSessions() throws {
        for file in try Self.files(in: "Sinks") {
            let above = try Self.names(in: file).intersection(Self.uploads.union(["Journal", "JournalEntry"]).union(Self.syncs))
            #expect(above.isEmpty, "\(file) names \(above.sorted())")
        }
    }

    @Test func theUploadsNameNoSessionAndNoSyncJob() throws {
        for file in try Self.files(in: "Upload") + ["RunRegistry.swift"] {
            let above = try Self.names(in: file).intersection(Self.sessions.union(Self.syncs))
            #expect(above.isEmpty, "\(file) names \(above.sorted())")
        }
    }

    @Test func theWriterHandsDownToTheSenderWhichNamesNeitherItNorTheUploader() throws {
        let writer = try Self.names(in: "Upload/JournalWriter.swift")
        #expect(writer.isDisjoint(with: ["Uploader", "RecordSink", "SenderStateMachine", "UploadScheduler"]), "\(writer.sorted())")
        for file in ["Upload/Sender.swift", "Upload/SenderStateMachine.swift"] {
            let used = try Self.names(in: file)
            #expect(used.isDisjoint(with: ["Uploader", "JournalWriter", "Destinations"]), "\(file) names \(used.sorted())")
        }
    }

    @Test func theStateMachinesDoNoIO() throws {
        let io: Set<String> = ["Uploader", "Sender", "JournalWriter", "RecordSink", "Task", "EventLoop", "Mutex", "FileManager", "Channel"]
        for file in ["Upload/UploadScheduler.swift", "Upload/SenderStateMachine.swift", "Upload/Spill.swift", "Upload/QueuedRecords.swift"] {
            let used = try Self.names(in: file)
            #expect(used.isDisjoint(with: io), "\(file) names \(used.sorted())")
        }
        let session = try Self.names(in: "Sessions/SessionStateMachine.swift")
        #expect(session.isDisjoint(with: io.union(["Journal", "Destinations", "DaemonServices"])), "\(session.sorted())")
    }
}
