"""MLflow's own API, per call: through armoryd://, against a real `mlflow server`, and against a
store that does nothing (MLflow's per-call floor), in one process and one run.
argv: armoryd socket, server URL, output JSON."""
import json
import os
import sys
import time


def percentiles(ns):
    ns = sorted(ns)
    at = lambda q: ns[min(len(ns) - 1, int(len(ns) * q))] / 1000
    return {"p50": round(at(0.5), 2), "p99": round(at(0.99), 2)}


def main():
    sock, server, output = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ["ARMORY_SOCKET"] = sock
    os.environ["MLFLOW_REGISTRY_URI"] = server  # MLflow probes pyspark per fluent call unless this is set
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Run, RunData, RunInfo
    from mlflow.store.tracking.abstract_store import AbstractStore
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    class NullStore(AbstractStore):
        """Does nothing: what is left is MLflow's own per-call cost."""

        def __init__(self, store_uri=None, artifact_uri=None):
            super().__init__()

        def get_run(self, run_id):
            return Run(RunInfo(run_id, "0", "u", "RUNNING", 0, None, "active", "null:/a"), RunData())

        def update_run_info(self, run_id, run_status, end_time, run_name):
            return self.get_run(run_id).info

        def log_batch(self, run_id, metrics, params, tags):
            pass

    _tracking_store_registry.register("nullstore", lambda store_uri=None, artifact_uri=None: NullStore())

    def measure(uri, run_id, n, out_fluent, out_direct):
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        with mlflow.start_run(run_id=run_id):
            for i in range(n):
                t = time.perf_counter_ns()
                mlflow.log_metric("fluent", i * 0.001, step=i)
                out_fluent.append(time.perf_counter_ns() - t)
        for i in range(n):
            t = time.perf_counter_ns()
            client.log_metric(run_id, "client", i * 0.001, step=i)
            out_direct.append(time.perf_counter_ns() - t)

    def new_run(uri):
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("bench-plugin") or client.get_experiment(client.create_experiment("bench-plugin"))
        return client.create_run(experiment.experiment_id).info.run_id

    # The floor and armoryd:// alternate in blocks, so that a busy neighbour slows both alike.
    samples = {label: ([], []) for label in ("do-nothing store", "mlflow server", "armoryd://")}
    measure(server, new_run(server), 200, *samples["mlflow server"])
    through_run = new_run("armoryd://")
    blocks, per_block = 40, 500
    for _ in range(blocks):
        measure("nullstore://", "0" * 32, per_block, *samples["do-nothing store"])
        measure("armoryd://", through_run, per_block, *samples["armoryd://"])
    results = {label: {"mlflow.log_metric_us": percentiles(fluent), "MlflowClient.log_metric_us": percentiles(direct), "calls": len(fluent)}
               for label, (fluent, direct) in samples.items()}
    floor, through = results["do-nothing store"], results["armoryd://"]
    for label, r in results.items():
        print(f"{label:<18} mlflow.log_metric p50 {r['mlflow.log_metric_us']['p50']:>9.2f} µs  p99 {r['mlflow.log_metric_us']['p99']:>9.2f} µs   "
              f"MlflowClient.log_metric p50 {r['MlflowClient.log_metric_us']['p50']:>9.2f} µs  p99 {r['MlflowClient.log_metric_us']['p99']:>9.2f} µs")
    ratio = {k: round(through[k]["p50"] / floor[k]["p50"], 2) for k in ("mlflow.log_metric_us", "MlflowClient.log_metric_us")}
    print(f"armoryd:// over MLflow's floor (p50): fluent {ratio['mlflow.log_metric_us']}x, client {ratio['MlflowClient.log_metric_us']}x")
    results["ratio_to_floor_p50"] = ratio
    with open(output, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
