import ArmoryProtocol

/// What the journal's records add up to: every live run (for the snapshot at the head of each
/// segment and for recovery), the settled watermark, and, while recovering, the records the sink
/// has not confirmed. A value type fed entry by entry, live and on replay alike.
public struct JournalState: Sendable {
    /// A record to hand to the sink again after a restart.
    public struct Pending: Sendable, Equatable {
        public var lsn: UInt64
        public var handle: String
        public var record: SinkRecord
    }

    public private(set) var runs: [String: RunEntry] = [:]
    /// Client sessions not yet ended, as of their latest record and mark.
    public private(set) var sessions: [String: SessionRecord] = [:]
    /// The sequence number of the last record of each run (a run is forgotten once it ended and
    /// everything up to it is settled).
    private var lastLSN: [String: UInt64] = [:]
    public private(set) var settled: UInt64 = 0
    public private(set) var highestLSN: UInt64 = 0
    /// Filled only when `collectPending` (recovery), up to about `pendingBudget` bytes.
    public private(set) var pending: [Pending] = []
    private var collectPending: Bool
    private let pendingBudget: Int
    private var pendingBytes = 0
    /// The first record past the budget (left on disk), and how many records came after.
    private var overflowFrom: UInt64?
    private var overflowCount = 0
    /// Spool files named by artifact records (while recovering), by sequence number.
    private var spools: [UInt64: String] = [:]
    /// The last record's sequence number.
    public private(set) var lastRecordLSN: UInt64 = 0

    public init(collectPending: Bool = false, pendingBudget: Int = .max) {
        self.collectPending = collectPending
        self.pendingBudget = pendingBudget
    }

    /// Unsettled records left on disk by a replay past its budget: from which sequence number
    /// (through `lastRecordLSN`), and about how many.
    public var leftOnDisk: (from: UInt64, count: Int)? {
        guard let overflowFrom, lastRecordLSN > settled else { return nil }
        return (max(overflowFrom, settled + 1), overflowCount)
    }

    public mutating func apply(_ entry: JournalEntry, lsn: UInt64) {
        highestLSN = max(highestLSN, lsn)
        switch entry {
        case .run(let e):
            runs[e.handle] = e
            lastLSN[e.handle] = max(lastLSN[e.handle] ?? 0, lsn)
        case .bind(let handle, let runID, let experimentID):
            runs[handle]?.runID = runID
            runs[handle]?.experimentID = experimentID
        case .settled(let upTo):
            settled = max(settled, upTo)
        case .session(let record):
            if (sessions[record.id]?.seq ?? 0) <= record.seq { sessions[record.id] = record }
        case .sessionMark(let id, let seq):
            if let held = sessions[id]?.seq, held < seq { sessions[id]!.seq = seq }
        case .sessionEnd(let id):
            sessions[id] = nil
        case .record(let handle, let record):
            switch record {
            case .createRun(let c):
                if runs[handle] == nil {
                    runs[handle] = RunEntry(
                        handle: handle, runID: c.runID, experimentID: c.experimentID, experimentName: c.experimentName,
                        name: c.name, ownerUID: c.ownerUID, status: .running, parentHandle: c.parentHandle,
                        params: [:], connection: nil, clientPID: c.clientPID)
                }
            case .log(let batch):
                for (k, v) in batch.params where runs[handle]?.params[k] == nil { runs[handle]?.params[k] = v }
            case .updateRun(let status, let endTime):
                runs[handle]?.status = status
                runs[handle]?.endTime = endTime
            case .artifact(_, let spool):
                if collectPending { spools[lsn] = spool }
            case .deleteTag:
                break
            }
            lastLSN[handle] = lsn
            lastRecordLSN = max(lastRecordLSN, lsn)
            if collectPending {
                let size = BatchLimits.memoryFootprint(record)
                if overflowFrom == nil && pendingBytes + size <= pendingBudget {
                    pending.append(Pending(lsn: lsn, handle: handle, record: record))
                    pendingBytes += size
                } else {
                    if overflowFrom == nil { overflowFrom = lsn }
                    overflowCount += 1
                }
            }
        }
    }

    /// The same state without the replay's records, to go on appending to.
    public var live: JournalState {
        var copy = self
        copy.collectPending = false
        copy.pending = []
        copy.overflowFrom = nil
        copy.spools = [:]
        return copy
    }

    /// Spool files that unsettled artifact records still need.
    public var unsettledSpoolFiles: Set<String> {
        Set(spools.filter { $0.key > settled }.values)
    }

    /// The records not yet settled, in order (after a full replay).
    public var unsettled: [Pending] { pending.filter { $0.lsn > settled } }

    /// Forgets runs that ended and whose every record is settled.
    public mutating func prune() {
        for (handle, entry) in runs where entry.status.isTerminal && (lastLSN[handle] ?? 0) <= settled {
            runs[handle] = nil
            lastLSN[handle] = nil
        }
    }

    /// What a new segment starts with: every live run, every live session and the watermark.
    public func snapshot() -> [JournalEntry] {
        runs.values.sorted { $0.handle < $1.handle }.map { JournalEntry.run($0) }
            + sessions.values.sorted { $0.id < $1.id }.map { JournalEntry.session($0) } + [.settled(settled)]
    }
}
