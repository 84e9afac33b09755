import ArmoryProtocol
import MLflow

/// What a sync destination holds for one source run: its experiment's id (nil when it does not
/// exist and was not to be created) and the run's copy (nil when there is none yet).
struct SyncedRunLookup: Sendable {
    var experimentID: String?
    var run: SyncDestination?
}

/// What a sync reads of its destination (docs/architecture.md, "Sync"), beside what the sink
/// writes: the experiment called `experimentName` (created when `create` and missing) and the
/// copy of a source run in it (found by its `armory.sync.source_run` tag) with the counts of
/// `metricKeys` it holds, from the copy's landed record where it has one. Waits out an
/// unreachable server for up to `patience` seconds, then throws `UNREACHABLE`.
protocol SyncDestinationReader: Sendable {
    func syncedRun(experimentName: String, create: Bool, sourceRunID: String, metricKeys: [String], patience: Double) async throws(ProtocolError) -> SyncedRunLookup
}

/// An MLflow server read through the sink's client (its credentials, TLS and timeouts).
extension RESTSink: SyncDestinationReader {
    func syncedRun(experimentName: String, create: Bool, sourceRunID: String, metricKeys: [String], patience: Double) async throws(ProtocolError) -> SyncedRunLookup {
        do {
            return try await Self.retrying(until: patience) { () async throws(MLflowError) -> SyncedRunLookup in
                let experimentID: String
                if create {
                    // Created as the daemon creates an evaluation's: MLflow's UI opens it on the runs table.
                    experimentID = try await self.experimentID(experimentName, createdWith: RunCreation.evaluationExperimentTags)
                } else {
                    guard let found = try await self.client.experiment(named: experimentName), found.lifecycleStage == "active" else { return SyncedRunLookup(experimentID: nil, run: nil) }
                    experimentID = found.id
                }
                guard let run = try await self.client.findRun(experimentID: experimentID, tag: SyncTags.sourceRun, value: sourceRunID) else {
                    return SyncedRunLookup(experimentID: experimentID, run: nil)
                }
                self.artifactURIs.withLock { $0[run.runID] = run.artifactURI }
                // Histories are read only for keys the copy's landed record does not count.
                var (counts, toRead) = SyncTags.counting(metricKeys, tags: run.tags)
                for key in toRead { counts[key] = try await self.client.metricHistory(run.runID, key: key).count }
                return SyncedRunLookup(
                    experimentID: experimentID,
                    run: SyncDestination(
                        runID: run.runID, status: run.status, endTime: run.endTime, params: run.params, tags: run.tags,
                        metricCounts: counts, artifactBytes: try await self.client.listArtifacts(runID: run.runID)))
            }
        } catch  where error.isRetryable {
            throw ProtocolError(.unreachable, "\(destination) did not answer for \(Int(patience)) s (last: \(error)). Check the address and that the server is up, then sync again: it resumes where it stopped.")
        } catch {
            throw Self.translate(error)
        }
    }
}

/// The local store read under the sink's lock, so no half-written file is counted.
extension FileStoreSink: SyncDestinationReader {
    func syncedRun(experimentName: String, create: Bool, sourceRunID: String, metricKeys: [String], patience: Double) async throws(ProtocolError) -> SyncedRunLookup {
        try store.withLock { (box: inout FileStoreBox) throws(ProtocolError) -> SyncedRunLookup in
            do {
                let id =
                    create
                    ? try box.store.experimentID(named: experimentName, tags: RunCreation.evaluationExperimentTags)
                    : try box.store.existingExperimentID(named: experimentName)
                guard let id else { return SyncedRunLookup(experimentID: nil, run: nil) }
                let reader = try FileStoreReader(root: box.store.root)
                guard let experiment = reader.experiments().first(where: { $0.id == id }),
                    let run = reader.runs(of: experiment).first(where: { !$0.isDeleted && reader.tag(of: $0, key: SyncTags.sourceRun) == sourceRunID })
                else {
                    return SyncedRunLookup(experimentID: id, run: nil)
                }
                box.experimentOfRun[run.info.runID] = id
                let tags = reader.tags(of: run)
                var (counts, toRead) = SyncTags.counting(metricKeys, tags: tags)
                for key in toRead { counts[key] = reader.metricCount(of: run, key: key) }
                return SyncedRunLookup(
                    experimentID: id,
                    run: SyncDestination(
                        runID: run.info.runID, status: run.info.status, endTime: run.info.endTime, params: reader.params(of: run), tags: tags,
                        metricCounts: counts, artifactBytes: reader.artifactSizes(of: run)))
            } catch {
                throw Self.translate(error)
            }
        }
    }
}
