import ArmoryProtocol
import MLflow
import Testing

@testable import ArmoryDaemon

@Suite struct SyncPlannerTests {
    let ended = FileStoreRun(runID: "src1", experimentID: "7", name: "benign", userID: "alice", status: .finished, startTime: 10, endTime: 20)

    func source(_ run: FileStoreRun? = nil, metrics: [String: Int] = ["loss": 100, "acc": 1]) -> SyncSource {
        SyncSource(
            run: run ?? ended, params: ["seed": "42", "model": "resnet"],
            tags: ["mlflow.runName": "benign", "mlflow.parentRunId": "srcParent", "armory.handle": "h1", "note": "x"],
            metricCounts: metrics, artifactBytes: ["exports/a.png": 1000])
    }

    func plain(_ map: StringMap) -> [String: String] { Dictionary(uniqueKeysWithValues: map.map { ($0.key, $0.value) }) }

    /// The destination's copy after `plan` fully landed.
    func landed(_ plan: SyncRunPlan, on before: SyncDestination?, source: SyncSource) -> SyncDestination {
        var d = before ?? SyncDestination(runID: "dst1", status: .running, endTime: nil, params: [:], tags: [:], metricCounts: [:], artifactBytes: [:])
        d.params.merge(plan.params) { $1 }
        d.tags.merge(plan.tags) { $1 }
        for m in plan.metrics { d.metricCounts[m.key] = m.from + m.count }
        for a in plan.artifacts { d.artifactBytes[a] = source.artifactBytes[a] }
        if let status = plan.status { (d.status, d.endTime) = status }
        d.tags.merge(plan.seal) { $1 }
        return d
    }

    @Test func aNewRunIsCreatedWithEverythingItsParentLinkRewrittenAndMarkedPartial() {
        let plan = SyncRunPlan.plan(source(), destination: nil, parentRunID: "dstParent", storeIdentity: "store-A")
        #expect(plan.create)
        #expect(
            plain(plan.tags) == [
                "mlflow.runName": "benign", "mlflow.parentRunId": "dstParent", "note": "x",
                SyncTags.sourceRun: "src1", SyncTags.sourceStore: "store-A", SyncTags.state: "partial",
            ])
        #expect(plain(plan.params) == ["seed": "42", "model": "resnet"])
        #expect(plan.metrics.map(\.key) == ["acc", "loss"] && plan.metrics.map(\.from) == [0, 0] && plan.metricPoints == 101)
        #expect(plan.artifacts == ["exports/a.png"])
        #expect(plan.status?.status == .finished && plan.status?.endTime == 20)
        #expect(plan.marksComplete)
    }

    @Test func syncingTwiceSendsNothing() {
        let first = SyncRunPlan.plan(source(), destination: nil, parentRunID: "dstParent", storeIdentity: "store-A")
        let copy = landed(first, on: nil, source: source())
        let second = SyncRunPlan.plan(source(), destination: copy, parentRunID: "dstParent", storeIdentity: "store-A")
        #expect(second.upToDate)
        #expect(second.metricPoints == 0 && !second.create)
    }

    @Test func aGrownRunSendsOnlyWhatIsNew() {
        let running = FileStoreRun(runID: "src1", experimentID: "7", name: "benign", userID: "alice", status: .running, startTime: 10)
        let first = SyncRunPlan.plan(source(running), destination: nil, parentRunID: nil, storeIdentity: "s")
        #expect(!first.marksComplete && first.status == nil)
        let copy = landed(first, on: nil, source: source(running))
        #expect(copy.tags[SyncTags.state] == "partial")  // still active: not complete
        let grown = source(ended, metrics: ["loss": 1100, "acc": 1])
        let second = SyncRunPlan.plan(grown, destination: copy, parentRunID: nil, storeIdentity: "s")
        #expect(second.metrics.count == 1 && second.metrics[0].key == "loss" && second.metrics[0].from == 100 && second.metrics[0].count == 1000)
        // The copy's landed record is emptied first: until the new points are confirmed, its
        // histories tell how far it got.
        #expect(copy.tags[SyncTags.landed] == #"{"acc":1,"loss":100}"#)
        #expect(second.params.isEmpty && second.artifacts.isEmpty && plain(second.tags) == [SyncTags.state: "partial", SyncTags.landed: "{}"])
        #expect(plain(second.seal) == [SyncTags.state: "complete", SyncTags.landed: #"{"acc":1,"loss":1100}"#])
        #expect(second.status?.status == .finished && second.marksComplete)
    }

    @Test func anInterruptedSyncResumesFromWhatLanded() {
        let plan = SyncRunPlan.plan(source(), destination: nil, parentRunID: nil, storeIdentity: "s")
        var partial = landed(plan, on: nil, source: source())
        partial.metricCounts["loss"] = 40  // the kill came mid-way: 40 of 100 points, no artifact, no status, no mark
        partial.artifactBytes = [:]
        partial.status = .running
        partial.endTime = nil
        partial.tags[SyncTags.state] = "partial"
        let resumed = SyncRunPlan.plan(source(), destination: partial, parentRunID: nil, storeIdentity: "s")
        #expect(!resumed.create && resumed.metrics.map(\.from) == [40] && resumed.metricPoints == 60)
        #expect(resumed.artifacts == ["exports/a.png"] && resumed.status?.status == .finished && resumed.marksComplete)
        // Everything landed, only the complete mark was lost: the mark alone is sent.
        var allButMark = landed(plan, on: nil, source: source())
        allButMark.tags[SyncTags.state] = "partial"
        allButMark.tags[SyncTags.landed] = nil
        let markOnly = SyncRunPlan.plan(source(), destination: allButMark, parentRunID: nil, storeIdentity: "s")
        #expect(markOnly.metricPoints == 0 && markOnly.tags.isEmpty && markOnly.marksComplete && !markOnly.upToDate)
        #expect(plain(markOnly.seal) == [SyncTags.state: "complete", SyncTags.landed: #"{"acc":1,"loss":100}"#])
    }

    @Test func aCopyWithoutALandedRecordGetsOneAndIsThenUpToDate() {
        var old = landed(SyncRunPlan.plan(source(), destination: nil, parentRunID: nil, storeIdentity: "s"), on: nil, source: source())
        old.tags[SyncTags.landed] = nil  // copied by an armoryd without landed records
        let plan = SyncRunPlan.plan(source(), destination: old, parentRunID: nil, storeIdentity: "s")
        #expect(plan.tags.isEmpty && plan.metricPoints == 0 && !plan.marksComplete && !plan.upToDate)
        #expect(plain(plan.seal) == [SyncTags.landed: #"{"acc":1,"loss":100}"#])
        #expect(SyncRunPlan.plan(source(), destination: landed(plan, on: old, source: source()), parentRunID: nil, storeIdentity: "s").upToDate)
    }

    @Test func theLandedRecordSaysWhichHistoriesNeedReading() {
        let tags: StringMap = [SyncTags.landed: SyncTags.landedValue(["loss": 1100, "acc": 1])]
        let counting = SyncTags.counting(["acc", "loss", "new"], tags: tags)
        #expect(counting.known == ["acc": 1, "loss": 1100] && counting.toRead == ["new"])
        #expect(SyncTags.counting(["acc"], tags: [SyncTags.landed: "{}"]).toRead == ["acc"])
        #expect(SyncTags.counting(["acc"], tags: [SyncTags.landed: "not json"]).toRead == ["acc"])
        #expect(SyncTags.counting(["acc"], tags: [:]).toRead == ["acc"])
        // Thousands of keys: as many as fit in one MLflow tag value; the rest are read.
        let many = Dictionary(uniqueKeysWithValues: (0..<5000).map { ("attack/sample_\($0)/loss", $0) })
        let value = SyncTags.landedValue(many)
        let recorded = SyncTags.landedCounts(in: [SyncTags.landed: value])
        #expect(value.utf8.count <= 8000 && recorded.count > 100 && recorded.count < 5000)
        #expect(recorded.allSatisfy { many[$0.key] == $0.value })
    }

    @Test func aChangedParamIsAConflictNotASend() {
        var copy = landed(SyncRunPlan.plan(source(), destination: nil, parentRunID: nil, storeIdentity: "s"), on: nil, source: source())
        copy.params["seed"] = "7"
        let plan = SyncRunPlan.plan(source(), destination: copy, parentRunID: nil, storeIdentity: "s")
        #expect(plan.params.isEmpty)
        #expect(plan.conflicts == [SyncParamConflict(key: "seed", source: "42", destination: "7")])
    }

    @Test func aChangedArtifactIsSentAgain() {
        var copy = landed(SyncRunPlan.plan(source(), destination: nil, parentRunID: nil, storeIdentity: "s"), on: nil, source: source())
        copy.artifactBytes["exports/a.png"] = 10  // cut short
        #expect(SyncRunPlan.plan(source(), destination: copy, parentRunID: nil, storeIdentity: "s").artifacts == ["exports/a.png"])
    }
}
