import ArmoryDaemon
import ArmoryProtocol
import Testing

/// Every rule of docs/architecture.md's "Tracking-context semantics" (Armory's `armory.track`), one test each.
@Suite struct TrackingStateTests {
    @Test func trackParamSetsAKeyInTheCurrentContext() {
        var s = TrackingState()
        s.trackParam(key: "batch_size", value: "16")
        #expect(s.currentParams == ["batch_size": "16"])
        #expect(s.globalParams == ["batch_size": "16"])
    }

    @Test func trackParamOverwriteWins() {
        var s = TrackingState()
        s.trackParam(key: "k", value: "1")
        s.trackParam(key: "k", value: "2")
        #expect(s.currentParams == ["k": "2"])
    }

    @Test func trackParamsRecordsFuncAndEachArgument() {
        var s = TrackingState()
        s.trackParams(prefix: "load_model", function: "example.load_model", values: ["name": "a", "extra": "True"])
        #expect(s.currentParams == ["load_model._func": "example.load_model", "load_model.name": "a", "load_model.extra": "True"])
    }

    /// The seeds' example: `load_model.name` is overwritten, `load_model.extra` is removed.
    @Test func trackParamsAgainRemovesOldKeysOfThePrefix() {
        var s = TrackingState()
        s.trackParam(key: "load_model_other", value: "kept")
        s.trackParams(prefix: "load_model", function: "m.load_model", values: ["name": "a", "extra": "True"])
        s.trackParams(prefix: "load_model", function: "m.load_model", values: ["name": "b"])
        #expect(s.currentParams == ["load_model_other": "kept", "load_model._func": "m.load_model", "load_model.name": "b"])
    }

    @Test func oldKeysStayWhenThePrefixHasNoFuncYet() {
        var s = TrackingState()
        s.trackParam(key: "p.manual", value: "1")
        s.trackParams(prefix: "p", function: "m.p", values: ["a": "2"])
        #expect(s.currentParams["p.manual"] == "1")
    }

    @Test func resetParamsClearsOnlyTheCurrentContext() {
        var s = TrackingState()
        s.trackParam(key: "global", value: "1")
        s.pushContext(nested: false, trackables: false)
        s.trackParam(key: "inner", value: "2")
        s.resetParams()
        #expect(s.currentParams.isEmpty)
        try! s.popContext()
        #expect(s.currentParams == ["global": "1"])
    }

    /// The seeds' `tracking_context` example.
    @Test func trackingContextStartsEmptyAndIsolated() throws {
        var s = TrackingState()
        s.trackParam(key: "global", value: "value")
        s.pushContext(nested: false, trackables: false)
        #expect(s.currentParams.isEmpty)
        s.trackParam(key: "parent", value: "value")
        s.pushContext(nested: true, trackables: false)
        s.trackParam(key: "child", value: "value")
        #expect(s.currentParams == ["parent": "value", "child": "value"])
        try s.popContext()
        #expect(s.currentParams == ["parent": "value"])
        try s.popContext()
        #expect(s.currentParams == ["global": "value"])
    }

    @Test func nestedContextIsACopyThatDoesNotSeeLaterParentChanges() throws {
        var s = TrackingState()
        s.trackParam(key: "a", value: "1")
        s.pushContext(nested: true, trackables: false)
        s.trackParam(key: "a", value: "changed-inside")
        try s.popContext()
        #expect(s.currentParams == ["a": "1"])  // nothing flows back
    }

    @Test func popWithoutPushIsAnError() {
        var s = TrackingState()
        #expect(throws: ProtocolError.self) { try s.popContext() }
    }

    @Test func trackableGetsTheContextParamsOnExit() throws {
        var s = TrackingState()
        s.pushContext(nested: false, trackables: true)
        s.trackParam(key: "key", value: "value")
        try s.registerTrackable(id: 1)
        #expect(try s.params(ofTrackable: 1).isEmpty)  // not until the context ends
        s.trackParam(key: "later", value: "also")
        try s.popContext()
        #expect(try s.params(ofTrackable: 1) == ["key": "value", "later": "also"])
        #expect(s.currentParams.isEmpty)
    }

    @Test func trackableOutsideAnyTrackableContextKeepsNoParams() throws {
        var s = TrackingState()
        s.trackParam(key: "global", value: "1")
        try s.registerTrackable(id: 1)
        #expect(try s.params(ofTrackable: 1).isEmpty)
    }

    /// A plain tracking context inside a trackable one does not capture trackables: they join
    /// the trackable context and get its params (Armory keeps two separate stacks).
    @Test func trackableInsideAPlainContextJoinsTheEnclosingTrackableContext() throws {
        var s = TrackingState()
        s.pushContext(nested: false, trackables: true)
        s.trackParam(key: "outer", value: "1")
        s.pushContext(nested: false, trackables: false)
        s.trackParam(key: "inner", value: "2")
        try s.registerTrackable(id: 7)
        try s.popContext()
        try s.popContext()
        #expect(try s.params(ofTrackable: 7) == ["outer": "1"])
    }

    @Test func nestedTrackableContextStartsFromACopy() throws {
        var s = TrackingState()
        s.trackParam(key: "g", value: "1")
        s.pushContext(nested: true, trackables: true)
        try s.registerTrackable(id: 1)
        try s.popContext()
        #expect(try s.params(ofTrackable: 1) == ["g": "1"])
    }

    @Test func duplicateTrackableIdsAreRefused() throws {
        var s = TrackingState()
        try s.registerTrackable(id: 1)
        #expect(throws: ProtocolError.self) { try s.registerTrackable(id: 1) }
    }

    @Test func chainMergeOrderLaterWins() throws {
        var s = TrackingState()
        try s.defineEvaluation(id: 100, name: "e", description: nil)
        // One trackable per role, each setting "k" (and a key of its own).
        let roles: [(ComponentRole, Int64)] = [(.dataset, 1), (.perturbations, 2), (.model, 3), (.metrics, 4), (.exporters, 5)]
        for (role, id) in roles {
            s.pushContext(nested: false, trackables: true)
            s.trackParam(key: "k", value: role.rawValue)
            s.trackParam(key: role.rawValue, value: "yes")
            try s.registerTrackable(id: id)
            try s.popContext()
        }
        s.pushContext(nested: false, trackables: true)
        s.trackParam(key: "k", value: "chain")
        s.trackParam(key: "own", value: "chain")
        try s.defineChain(id: 10, evaluation: 100, name: "c")
        try s.popContext()
        // Configure in reverse order: the merge order is fixed, not the order of use.
        for (role, id) in roles.reversed() { try s.use(target: 10, role: role, ids: [id], append: false) }
        let merged = try s.chainParams(id: 10)
        #expect(merged["k"] == "exporters")
        #expect(merged["own"] == "chain")
        #expect(merged["dataset"] == "yes" && merged["model"] == "yes" && merged["metrics"] == "yes")
    }

    @Test func chainsStartFromTheEvaluationDefaultsOfThatMoment() throws {
        var s = TrackingState()
        try s.defineEvaluation(id: 100, name: "e", description: nil)
        s.pushContext(nested: false, trackables: true)
        s.trackParam(key: "dataset.split", value: "test")
        try s.registerTrackable(id: 1)
        try s.popContext()
        try s.use(target: 100, role: .dataset, ids: [1], append: false)
        try s.defineChain(id: 10, evaluation: 100, name: "first")
        try s.use(target: 100, role: .dataset, ids: [], append: false)  // later default change
        try s.defineChain(id: 11, evaluation: 100, name: "second")
        #expect(try s.chainParams(id: 10)["dataset.split"] == "test")
        #expect(try s.chainParams(id: 11)["dataset.split"] == nil)
    }

    @Test func chainUseReplacesAndAddAppends() throws {
        var s = TrackingState()
        try s.defineEvaluation(id: 100, name: "e", description: nil)
        for id: Int64 in 1...3 {
            s.pushContext(nested: false, trackables: true)
            s.trackParam(key: "p\(id)", value: "1")
            try s.registerTrackable(id: id)
            try s.popContext()
        }
        try s.defineChain(id: 10, evaluation: 100, name: "c")
        try s.use(target: 10, role: .perturbations, ids: [1], append: false)
        try s.use(target: 10, role: .perturbations, ids: [2], append: true)
        #expect(Set(try s.chainParams(id: 10).keys) == ["p1", "p2"])
        try s.use(target: 10, role: .perturbations, ids: [3], append: false)
        #expect(Set(try s.chainParams(id: 10).keys) == ["p3"])
    }

    @Test func globalParamsDoNotGoToChains() throws {
        var s = TrackingState()
        s.trackParam(key: "global", value: "1")
        try s.defineEvaluation(id: 100, name: "e", description: nil)
        s.pushContext(nested: false, trackables: true)
        try s.defineChain(id: 10, evaluation: 100, name: "c")
        try s.popContext()
        #expect(try s.chainParams(id: 10)["global"] == nil)
        #expect(s.globalParams["global"] == "1")
    }

    @Test func chainNamesAreUniquePerEvaluation() throws {
        var s = TrackingState()
        try s.defineEvaluation(id: 100, name: "e", description: nil)
        try s.defineChain(id: 10, evaluation: 100, name: "benign")
        #expect(throws: ProtocolError.self) { try s.defineChain(id: 11, evaluation: 100, name: "benign") }
    }

    @Test func unknownIdsAreClearErrors() {
        var s = TrackingState()
        #expect(throws: ProtocolError.self) { try s.defineChain(id: 10, evaluation: 99, name: "c") }
        #expect(throws: ProtocolError.self) { try s.use(target: 99, role: .model, ids: [], append: false) }
        #expect(throws: ProtocolError.self) { try s.chainParams(id: 99) }
        #expect(throws: ProtocolError.self) { try s.params(ofTrackable: 99) }
    }
}
