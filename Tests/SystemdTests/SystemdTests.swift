import Logging
import Testing

@testable import Systemd

/// The pure parts of the systemd integration: journald field names and priorities, notify lines.
@Suite struct SystemdTests {
    @Test func metadataKeysBecomeJournaldFieldNames() {
        #expect(JournalLogHandler.fieldName("run_id") == "RUN_ID")
        #expect(JournalLogHandler.fieldName("client-pid") == "CLIENT_PID")
        #expect(JournalLogHandler.fieldName("_private") == "PRIVATE")  // a leading underscore is journald's own
        #expect(JournalLogHandler.fieldName("9lives") == "F9LIVES")
        #expect(JournalLogHandler.fieldName("ünï٣") == "N__")
    }

    @Test func levelsBecomeSyslogPriorities() {
        #expect(JournalLogHandler.priority(.critical) == 2)
        #expect(JournalLogHandler.priority(.error) == 3)
        #expect(JournalLogHandler.priority(.warning) == 4)
        #expect(JournalLogHandler.priority(.notice) == 5)
        #expect(JournalLogHandler.priority(.info) == 6)
        #expect(JournalLogHandler.priority(.debug) == 7)
    }

    @Test func aStatusIsOneLine() {
        #expect(SystemdNotifier.oneLine("a\nb\r\nc") == "a b c")
    }

    @Test func withoutNotifySocketNothingIsSent() {
        let notifier = SystemdNotifier(environment: [:])
        #expect(!notifier.isActive)
        notifier.ready(status: "x")  // a no-op, not a crash
    }
}
