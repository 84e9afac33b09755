"""Aggregate throughput of 1, 2 and 4 armoryd hosts into one PostgreSQL-backed `mlflow server`
(deploy/testbed.py), next to raw `log-batch` calls at the same total concurrency against the
same server, measured before and after each armoryd row (the server slows as its tables grow).

    .venv/bin/python Benchmarks/lab_bench.py [--metrics 120000] [--hosts 1,2,4]   # make bench-lab
"""
import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy"))
from testbed import Lab  # noqa: E402

UPLOAD_CONCURRENCY = 4  # armoryd's default --upload-concurrency


def post(port: int, path: str, body: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/api/2.0/mlflow/" + path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {data[:300]!r}")
    return json.loads(data or b"{}")


def raw_log_batch(port: int, loops: int, metrics: int) -> float:
    """`loops` threads posting prebuilt 1000-metric bodies (10 steps × 100 keys) to a run each."""
    experiment = post(port, "experiments/create", {"name": f"raw-{uuid.uuid4().hex[:8]}"})["experiment_id"]
    now = int(time.time() * 1000)
    bodies = []
    for _ in range(loops):
        run = post(port, "runs/create", {"experiment_id": experiment, "start_time": now})["run"]["info"]["run_id"]
        bodies.append([json.dumps({"run_id": run, "metrics": [
            {"key": f"m{k}", "value": float(k), "step": step, "timestamp": now + step}
            for step in range(b * 10, b * 10 + 10) for k in range(100)]}).encode() for b in range(metrics // loops // 1000)])

    def send(run_bodies):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for body in run_bodies:
            conn.request("POST", "/api/2.0/mlflow/runs/log-batch", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
        conn.close()

    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(len(b) for b in bodies) * 1000 / (time.monotonic() - start)


def armoryd_hosts(lab: Lab, hosts: int, metrics: int, evaluations_per_host: int = 2) -> float:
    """`evaluations_per_host` evaluation processes on each of `hosts` hosts, 100 metrics per step;
    timed from their common start until every host's daemon has the server's confirmation."""
    steps = metrics // (hosts * evaluations_per_host * 100)
    experiment = f"lab-bench-{uuid.uuid4().hex[:8]}"
    start_at = time.time() + 4
    processes = []
    for host in lab.hosts[:hosts]:
        for e in range(evaluations_per_host):
            processes.append(subprocess.Popen(
                [sys.executable, str(ROOT / "deploy" / "lab_evaluation.py"), "--experiment", experiment, "--label", f"h{host.index}-e{e}",
                 "--chains", "1", "--keys", "100", "--steps", str(steps), "--no-artifact", "--start-at", str(start_at)],
                env=host.client_env(), stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL))
    for p in processes:
        if p.wait() != 0:
            raise RuntimeError("a benchmark evaluation failed")
    for host in lab.hosts[:hosts]:
        subprocess.run([str(lab.armoryd.parent / "armoryctl"), "flush", "--wait", "--timeout", "900", "--socket", host.socket],
                       check=True, stdout=subprocess.DEVNULL)
    return steps * 100 * hosts * evaluations_per_host / (time.time() - start_at)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", type=int, default=120_000, help="metrics per row, split across the hosts' evaluations")
    parser.add_argument("--hosts", default="1,2,4")
    parser.add_argument("--armoryd", default=str(ROOT / ".build" / "release" / "armoryd"))
    parser.add_argument("--output", default=str(ROOT / "Benchmarks" / "results" / "lab-latest.json"))
    args = parser.parse_args()
    counts = [int(h) for h in args.hosts.split(",")]
    with tempfile.TemporaryDirectory(prefix="armory-lab-bench-") as directory:
        lab = Lab(Path(directory), max(counts), armoryd=Path(args.armoryd))
        rows = []
        try:
            for n in counts:
                before = raw_log_batch(lab.server.port, n * UPLOAD_CONCURRENCY, args.metrics)
                armoryd = armoryd_hosts(lab, n, args.metrics)
                after = raw_log_batch(lab.server.port, n * UPLOAD_CONCURRENCY, args.metrics)
                raw = (before + after) / 2
                rows.append({"hosts": n, "armoryd_metrics_per_s": round(armoryd), "raw_log_batch_metrics_per_s": round(raw),
                             "raw_before": round(before), "raw_after": round(after), "concurrency": n * UPLOAD_CONCURRENCY,
                             "ratio": armoryd / raw})
                print(f"{n} host(s): armoryd {armoryd:8.0f} metrics/s   raw log-batch ({n * UPLOAD_CONCURRENCY} concurrent) "
                      f"{raw:8.0f} metrics/s ({before:.0f} before, {after:.0f} after)   {armoryd / raw:.2f}x", flush=True)
        finally:
            lab.close()
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "namespaces": lab.namespaces, "metrics_per_row": args.metrics,
              "server": "mlflow server, 4 workers, PostgreSQL", "rows": rows}
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"results: {args.output}")


if __name__ == "__main__":
    main()
