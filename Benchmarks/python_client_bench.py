"""Python call costs, one run, one machine: armory_track's `chain.log_metric` next to the raw
per-call `sendall` baseline and to MLflow's own client (synchronous and `synchronous=False`) against the same
local `mlflow server`. Prints a table and writes JSON (argv: armoryd socket, server URL, output)."""
import json
import os
import socket
import sys
import threading
import time


def percentiles(ns):
    ns = sorted(ns)
    at = lambda q: ns[min(len(ns) - 1, int(len(ns) * q))] / 1000
    return {"p50": round(at(0.5), 2), "p99": round(at(0.99), 2), "p99_9": round(at(0.999), 2)}


def raw_sendall_floor(frame: bytes, n: int):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    threading.Thread(target=lambda: [None for _ in iter(lambda: b.recv(1 << 16), b"")], daemon=True).start()
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        a.sendall(frame)
        out.append(time.perf_counter_ns() - t)
    a.close()
    return out


def main():
    sock, server, output = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ["ARMORY_SOCKET"] = sock
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import armory_track

    n = 100_000
    evaluation = armory_track.Evaluation("bench-python")
    with evaluation.add_chain("calls") as chain:
        pass
    chain.start()
    for i in range(2000):
        chain.log_metric("warmup", float(i), step=i)
    armory_track.flush("uploaded", timeout=60)
    calls = []
    for i in range(n):
        t = time.perf_counter_ns()
        chain.log_metric("loss", i * 0.001, step=i)
        calls.append(time.perf_counter_ns() - t)
    armory_track.flush("uploaded", timeout=300)
    evaluation.end()
    frame = b'\x00\x00\x00Z{"op":"log","run":"h0123456789abcdef0123","metrics":[["loss",0.123,4567,1795400000000]],"seq":123456}'
    floor = raw_sendall_floor(frame, n)

    import mlflow
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_REGISTRY_URI"] = server  # avoids MLflow's per-call registry probing
    mlflow.set_tracking_uri(server)
    mlflow.set_experiment("bench-mlflow-client")
    with mlflow.start_run():
        sync = []
        for i in range(200):
            t = time.perf_counter_ns()
            mlflow.log_metric("loss", i * 0.001, step=i)
            sync.append(time.perf_counter_ns() - t)
        asynchronous = []
        for i in range(5000):
            t = time.perf_counter_ns()
            mlflow.log_metric("loss_async", i * 0.001, step=i, synchronous=False)
            asynchronous.append(time.perf_counter_ns() - t)
        t = time.perf_counter()
        mlflow.flush_async_logging()
        async_drain_s = time.perf_counter() - t

    results = {
        "armory_track_log_metric_us": percentiles(calls), "raw_sendall_us": percentiles(floor),
        "mlflow_sync_log_metric_us": percentiles(sync), "mlflow_async_log_metric_us": percentiles(asynchronous),
        "mlflow_async_drain_s_for_5000": round(async_drain_s, 2), "calls": n,
    }
    rows = [("armory_track chain.log_metric", results["armory_track_log_metric_us"]),
            ("baseline: one sendall per call, prebuilt", results["raw_sendall_us"]),
            ("MLflow log_metric (synchronous)", results["mlflow_sync_log_metric_us"]),
            ("MLflow log_metric (synchronous=False)", results["mlflow_async_log_metric_us"])]
    for name, p in rows:
        print(f"{name:<44} p50 {p['p50']:>10.2f} µs  p99 {p['p99']:>10.2f} µs")
    a, f = results["armory_track_log_metric_us"], results["raw_sendall_us"]
    print(f"{'ratio to one sendall per call':<44} p50 {a['p50'] / f['p50']:.2f}x   vs synchronous MLflow {results['mlflow_sync_log_metric_us']['p50'] / a['p50']:.0f}x faster")
    print(f"MLflow's async queue drained 5000 metrics in {async_drain_s:.2f} s")
    with open(output, "w") as out:
        json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
