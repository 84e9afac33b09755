import ArmoryProtocol
import Testing

@Suite struct MLflowRulesTests {
    @Test(arguments: ["loss", "system/cpu_utilization_percentage", "a.b-c d:e", "load_model._func", "naïve", "数据", "x/y/z", "a..b"])
    func acceptsValidKeys(_ key: String) throws {
        try MLflowRules.validateKey(key, kind: .metric)
    }

    @Test(arguments: ["", "/lead", "a//b", "trail/", "./a", "a/./b", "..", "../a", "a/..", ".", "semi;colon", "new\nline", "tab\t", "quote\"", "a\\b", "star*"])
    func refusesInvalidKeys(_ key: String) {
        #expect(throws: ProtocolError.self) { try MLflowRules.validateKey(key, kind: .param) }
    }

    @Test func errorNamesTheKeyAndTheFix() {
        do {
            try MLflowRules.validateKey("bad key!", kind: .metric)
            Issue.record("accepted")
        } catch {
            #expect(error.code == .invalidKey)
            #expect(error.message.contains("'bad key!'"))
            #expect(error.message.contains("may only contain"))
        }
    }

    @Test func keyLengthLimit() throws {
        try MLflowRules.validateKey(String(repeating: "k", count: 250), kind: .tag)
        #expect(throws: ProtocolError.self) { try MLflowRules.validateKey(String(repeating: "k", count: 251), kind: .tag) }
    }

    @Test func valueLengthLimits() throws {
        try MLflowRules.validateParamValue(String(repeating: "v", count: 6000), key: "p")
        #expect(throws: ProtocolError.self) { try MLflowRules.validateParamValue(String(repeating: "v", count: 6001), key: "p") }
        try MLflowRules.validateTagValue(String(repeating: "v", count: 8000), key: "t")
        #expect(throws: ProtocolError.self) { try MLflowRules.validateTagValue(String(repeating: "v", count: 8001), key: "t") }
        // Characters, not bytes (Python's len()).
        try MLflowRules.validateParamValue(String(repeating: "é", count: 6000), key: "p")
    }

    @Test(arguments: [
        ("", "."), ("a//b", "a/b"), ("/a/../b", "/b"), ("//a", "//a"), ("///a", "/a"), ("a/./b/", "a/b"),
        ("../x", "../x"), ("a/../../x", "../x"), ("/..", "/"), ("a/..", "."),
    ])
    func normalizesPathsLikePython(_ input: String, _ expected: String) {
        #expect(MLflowRules.posixNormalizedPath(input) == expected)
    }

    @Test func negativeTimestampsAreRefused() {
        #expect(throws: ProtocolError.self) { try MLflowRules.validateMetric(MetricPoint(key: "k", value: 1, timestamp: -1)) }
    }
}

/// The allocation-free fast path of the key check agrees with the full one: every key it passes
/// passes `validateKey`, and the ASCII keys `validateKey` passes (without `.` segments) pass it too.
@Suite struct PlainKeyTests {
    static let alphabet: [Character] = ["a", "Z", "0", "_", "-", ".", " ", ":", "/", "!", "é"]

    @Test func agreesWithTheFullCheckOnEveryShortKey() {
        var keys: [String] = [""]
        for length in 1...4 {
            var next: [String] = []
            for key in keys where key.count == length - 1 { for c in Self.alphabet { next.append(key + String(c)) } }
            keys += next
        }
        keys += [String(repeating: "k", count: 250), String(repeating: "k", count: 251), "system/cpu_utilization_percentage", "a/./b", "a/../b", "...", "a/..."]
        for key in keys {
            let valid = (try? MLflowRules.validateKey(key, kind: .metric)) != nil
            if MLflowRules.isPlainValidKey(key) { #expect(valid, "\(key) passes the fast check only") }
            if valid && key.allSatisfy(\.isASCII) { #expect(MLflowRules.isPlainValidKey(key), "\(key) is valid but not plain") }
        }
    }
}

@Suite struct PythonFloatTests {
    /// Expected strings printed by CPython 3.11's `repr(float)`.
    @Test(arguments: [
        (1.0, "1.0"), (0.1, "0.1"), (1e-300, "1e-300"), (1e16, "1e+16"), (1e15, "1000000000000000.0"),
        (123456789.0, "123456789.0"), (0.0001, "0.0001"), (0.00001, "1e-05"), (-2.5, "-2.5"),
        (1.0 / 3.0, "0.3333333333333333"), (Double.leastNonzeroMagnitude, "5e-324"), (1.7976931348623157e308, "1.7976931348623157e+308"),
        (100.0, "100.0"), (12345678901234567890.0, "1.2345678901234567e+19"), (0.5, "0.5"),
        (9007199254740992.0, "9007199254740992.0"), (-0.0, "-0.0"), (1e22, "1e+22"), (1.5e-7, "1.5e-07"),
        (Double.nan, "nan"), (Double.infinity, "inf"), (-Double.infinity, "-inf"),
    ])
    func matchesCPython(_ value: Double, _ expected: String) {
        #expect(PythonFloat.repr(value) == expected)
    }
}

@Suite struct SocketDiscoveryTests {
    @Test func explicitSocketIsTheOnlyCandidate() {
        let env = ["ARMORY_SOCKET": "/x.sock", "XDG_RUNTIME_DIR": "/run/user/1000"]
        #expect(SocketDiscovery.clientCandidates(environment: env) { _ in true } == ["/x.sock"])
    }

    @Test func userSocketOnlyWhenItExists() {
        let env = ["XDG_RUNTIME_DIR": "/run/user/1000"]
        #expect(SocketDiscovery.clientCandidates(environment: env) { _ in true } == ["/run/user/1000/armory/armoryd.sock", "/run/armory/armoryd.sock"])
        #expect(SocketDiscovery.clientCandidates(environment: env) { _ in false } == ["/run/armory/armoryd.sock"])
    }

    @Test func daemonBindOrder() {
        let env = ["ARMORY_SOCKET": "/env.sock", "XDG_RUNTIME_DIR": "/run/user/1000"]
        #expect(SocketDiscovery.daemonPath(flag: "/flag.sock", environment: env, isRoot: false) == "/flag.sock")
        #expect(SocketDiscovery.daemonPath(flag: nil, environment: env, isRoot: false) == "/env.sock")
        #expect(SocketDiscovery.daemonPath(flag: nil, environment: ["XDG_RUNTIME_DIR": "/run/user/1000"], isRoot: false) == "/run/user/1000/armory/armoryd.sock")
        #expect(SocketDiscovery.daemonPath(flag: nil, environment: [:], isRoot: true) == "/run/armory/armoryd.sock")
        #expect(SocketDiscovery.daemonPath(flag: nil, environment: [:], isRoot: false) == nil)
    }
}
