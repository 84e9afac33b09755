import Testing

@testable import ArmoryDaemon

/// The upload rate `armoryctl status` shows: counts per second over a sliding window.
@Suite struct RateWindowTests {
    @Test func theRateIsTheWindowsMeanAndOldSecondsDropOut() {
        var window = RateWindow(seconds: 10)
        for second in 0..<10 { window.add(100, atMs: Int64(second) * 1000 + 500) }
        #expect(window.perSecond(atMs: 9_999) == 100)
        #expect(window.perSecond(atMs: 14_000) == 50)  // seconds 5…14: five of them empty
        window.add(1000, atMs: 14_100)  // reuses the slot of second 4
        #expect(window.perSecond(atMs: 14_200) == 150)
        #expect(window.perSecond(atMs: 40_000) == 0)
    }
}
