import ArmoryProtocol
import Foundation
import MLflow

/// The tags `armoryctl sync` keeps on every destination run it writes.
public enum SyncTags {
    /// The source run's id: how a later sync, from this host or another, finds the copy.
    public static let sourceRun = "armory.sync.source_run"
    /// The source store's identity (where the run was copied from).
    public static let sourceStore = "armory.sync.source_store"
    /// `partial` while a run is being copied, `complete` once everything in it has landed.
    public static let state = "armory.sync.state"
    /// How many points of each metric key the copy holds (JSON, `{"loss": 1100}`), written once
    /// the destination confirmed them and emptied (`{}`) by the first record of a sync that sends
    /// more: a later sync reads a key's history only where this record lacks it
    /// (docs/architecture.md, "Sync").
    public static let landed = "armory.sync.landed"
    /// MLflow's limit on a tag value; the landed record leaves out keys past it.
    static let tagValueLimit = 8000

    /// The landed record's counts; empty when the tag is missing or unreadable.
    public static func landedCounts(in tags: StringMap) -> [String: Int] {
        guard let text = tags[landed], let data = text.data(using: .utf8),
            let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any]
        else { return [:] }
        return object.compactMapValues { ($0 as? NSNumber)?.intValue }
    }

    /// The landed record of `counts`: keys in order, as many as fit in a tag value.
    public static func landedValue(_ counts: [String: Int]) -> String {
        let keys = counts.keys.sorted()
        var taken = keys.count
        while true {
            let object = Dictionary(uniqueKeysWithValues: keys.prefix(taken).map { ($0, counts[$0]!) })
            let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
            if data.count <= tagValueLimit { return String(decoding: data, as: UTF8.self) }
            // Keys take about the same room each: cut to the share that fits, with a margin.
            taken = min(taken - 1, taken * tagValueLimit * 9 / (data.count * 10))
        }
    }

    /// The keys of `keys` a copy's history must be read for, and the counts its landed record gives.
    public static func counting(_ keys: [String], tags: StringMap) -> (known: [String: Int], toRead: [String]) {
        let recorded = landedCounts(in: tags)
        return (recorded.filter { keys.contains($0.key) }, keys.filter { recorded[$0] == nil })
    }
    /// Source tags a copy never carries: the daemon's own run handle, and the parent link
    /// (rewritten to the destination's parent id).
    static let dropped: Set<String> = ["armory.handle", "mlflow.parentRunId"]
}

/// What a source run holds, as `FileStoreReader` read it.
public struct SyncSource: Sendable, Equatable {
    public var run: FileStoreRun
    public var params: StringMap
    public var tags: StringMap
    public var metricCounts: [String: Int]
    public var artifactBytes: [String: Int]

    public init(run: FileStoreRun, params: StringMap, tags: StringMap, metricCounts: [String: Int], artifactBytes: [String: Int]) {
        self.run = run
        self.params = params
        self.tags = tags
        self.metricCounts = metricCounts
        self.artifactBytes = artifactBytes
    }
}

/// What the destination already holds of a copied run (found by its `armory.sync.source_run` tag).
public struct SyncDestination: Sendable, Equatable {
    public var runID: String
    public var status: RunStatus
    public var endTime: Int64?
    public var params: StringMap
    public var tags: StringMap
    public var metricCounts: [String: Int]
    public var artifactBytes: [String: Int]

    public init(runID: String, status: RunStatus, endTime: Int64?, params: StringMap, tags: StringMap, metricCounts: [String: Int], artifactBytes: [String: Int]) {
        self.runID = runID
        self.status = status
        self.endTime = endTime
        self.params = params
        self.tags = tags
        self.metricCounts = metricCounts
        self.artifactBytes = artifactBytes
    }
}

/// A param the destination already holds with another value (MLflow params never change).
public struct SyncParamConflict: Sendable, Equatable {
    public var key: String
    public var source: String
    public var destination: String
}

/// What one run's sync sends, in this order: create (or reuse), params, tags, the metric points
/// the destination lacks, artifacts, the run's status, and the `complete` mark last.
///
/// Metrics resume by count: the destination's history of a key is a prefix of the source's
/// lines (a sync appends them in file order), so lines from its count on are the new ones.
public struct SyncRunPlan: Sendable, Equatable {
    /// Whether the run must be created (else it exists at the destination).
    public var create: Bool
    /// Tags at creation (with `state` = `partial`), or tags to set on the existing run.
    public var tags: StringMap
    public var params: StringMap
    public var conflicts: [SyncParamConflict]
    /// Per metric key, the source lines to send: `from` (the destination's count) up to `through`.
    public var metrics: [(key: String, from: Int, count: Int)]
    public var artifacts: [String]
    /// The run's final status, when it has one the destination lacks.
    public var status: (status: RunStatus, endTime: Int64?)?
    /// Nothing to send: the destination's copy holds everything (and is marked as it should be).
    public var upToDate: Bool { !create && tags.isEmpty && params.isEmpty && metrics.isEmpty && artifacts.isEmpty && status == nil && !marksComplete && landed == nil }
    /// Whether `state` = `complete` is set last (the source run has ended, and the copy is not
    /// marked complete yet or this sync sends more).
    public var marksComplete: Bool
    /// The landed record written last, once everything landed (nil: the copy holds it already).
    public var landed: String?

    /// The tags set once everything the plan sends has landed.
    public var seal: StringMap {
        var tags = StringMap()
        if let landed { tags[SyncTags.landed] = landed }
        if marksComplete { tags[SyncTags.state] = "complete" }
        return tags
    }

    public var metricPoints: Int { metrics.reduce(0) { $0 + $1.count } }

    public static func == (a: SyncRunPlan, b: SyncRunPlan) -> Bool {
        a.create == b.create && a.tags == b.tags && a.params == b.params && a.conflicts == b.conflicts
            && a.metrics.map { "\($0.key) \($0.from) \($0.count)" } == b.metrics.map { "\($0.key) \($0.from) \($0.count)" }
            && a.artifacts == b.artifacts && a.status?.status == b.status?.status && a.status?.endTime == b.status?.endTime && a.marksComplete == b.marksComplete
            && a.landed == b.landed
    }

    /// Plans one run: `destination` is nil when no copy exists yet; `parentRunID` is the
    /// destination id of the source's parent (nil for a top-level run, or while it is pending).
    public static func plan(_ source: SyncSource, destination: SyncDestination?, parentRunID: String?, storeIdentity: String) -> SyncRunPlan {
        var wanted = source.tags.filter { !SyncTags.dropped.contains($0.key) && !$0.key.hasPrefix("armory.sync.") }
        wanted[SyncTags.sourceRun] = source.run.runID
        wanted[SyncTags.sourceStore] = storeIdentity
        if let parentRunID { wanted["mlflow.parentRunId"] = parentRunID }
        let existing = destination ?? SyncDestination(runID: "", status: .running, endTime: nil, params: [:], tags: [:], metricCounts: [:], artifactBytes: [:])

        var params = StringMap()
        var conflicts: [SyncParamConflict] = []
        for (key, value) in source.params.sorted(by: { $0.key < $1.key }) {
            switch existing.params[key] {
            case nil: params[key] = value
            case value?: break
            case let other?: conflicts.append(SyncParamConflict(key: key, source: value, destination: other))
            }
        }
        let metrics = source.metricCounts.sorted { $0.key < $1.key }.compactMap { key, count -> (key: String, from: Int, count: Int)? in
            let have = existing.metricCounts[key] ?? 0
            return count > have ? (key, have, count - have) : nil
        }
        let artifacts = source.artifactBytes.sorted { $0.key < $1.key }.filter { existing.artifactBytes[$0.key] != $0.value }.map(\.key)
        let ended = source.run.status != .running
        let status: (status: RunStatus, endTime: Int64?)? =
            ended && (existing.status != source.run.status || existing.endTime != source.run.endTime)
            ? (source.run.status, source.run.endTime) : nil

        var tags = wanted.filter { existing.tags[$0.key] != $0.value }
        let sends = destination == nil || !params.isEmpty || !metrics.isEmpty || !artifacts.isEmpty || status != nil || !tags.isEmpty
        // Partial from the first record this sync sends until its last one: complete once the
        // source run has ended and everything landed (a run still active stays partial).
        if sends { tags[SyncTags.state] = "partial" }
        // Until what this sync sends is confirmed, the copy's histories tell how far it got.
        if sends, let recorded = existing.tags[SyncTags.landed], recorded != "{}" { tags[SyncTags.landed] = "{}" }
        let marksComplete = ended && (sends || existing.tags[SyncTags.state] != "complete")
        let landed = SyncTags.landedValue(source.metricCounts.reduce(into: [:]) { $0[$1.key] = max($1.value, existing.metricCounts[$1.key] ?? 0) })
        return SyncRunPlan(
            create: destination == nil, tags: tags, params: params, conflicts: conflicts, metrics: metrics,
            artifacts: artifacts, status: status, marksComplete: marksComplete,
            landed: sends || existing.tags[SyncTags.landed] != landed ? landed : nil)
    }
}
