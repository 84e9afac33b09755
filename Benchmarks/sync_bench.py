"""`armoryctl sync` throughput into a local `mlflow server` (SQLite, proxied artifacts): metrics/s
next to raw `log-batch` calls at armoryd's upload concurrency (measured before and after the
sync, against the same server), and artifact MB/s next to raw artifact PUTs of the same files.
The source stores are written by MLflow's own client, as a store carried off an offline host.
Then the same store synced again (nothing to send), with the copies' `armory.sync.landed`
records and, as the baseline, without them (what a sync did before them: read every history).

    .venv/bin/python Benchmarks/sync_bench.py [--mlflow URL] [--metrics 200000] [--artifact-mb 1024]   # make bench-sync
"""
import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # the source stores are written by MLflow's file store
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Benchmarks"))
from lab_bench import UPLOAD_CONCURRENCY, post, raw_log_batch  # noqa: E402

RUNS = 8
KEYS = 100
SHARD_MB = 64


def start_server(directory: Path) -> tuple[subprocess.Popen, str]:
    """An `mlflow server` as `make bench` runs it: SQLite, 4 workers, proxied artifacts."""
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{directory}/mlflow.db",
         "--artifacts-destination", str(directory / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "4"],
        cwd=directory, stdout=open(directory / "mlflow.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    time.sleep(15)  # the server's job consumers busy the CPU for a while after it answers
    return server, url


def metrics_store(path: Path, metrics: int) -> Path:
    """`RUNS` finished runs of `metrics / RUNS` points each, `KEYS` keys per step."""
    client = MlflowClient(f"file://{path}")
    experiment = client.create_experiment(f"sync-bench-metrics-{uuid.uuid4().hex[:8]}")
    now = int(time.time() * 1000)
    steps = metrics // RUNS // KEYS
    for r in range(RUNS):
        run = client.create_run(experiment, run_name=f"r{r}").info.run_id
        for start in range(0, steps, 10):
            client.log_batch(run, metrics=[Metric(f"m{k}", float(k * step), now + step, step)
                                           for step in range(start, min(steps, start + 10)) for k in range(KEYS)])
        client.set_terminated(run)
    return path


def artifact_store(path: Path, megabytes: int) -> tuple[Path, list[Path]]:
    """One finished run holding `megabytes` of artifacts in `SHARD_MB` shards of random bytes."""
    client = MlflowClient(f"file://{path}")
    run = client.create_run(client.create_experiment(f"sync-bench-artifacts-{uuid.uuid4().hex[:8]}"), run_name="weights").info
    client.set_terminated(run.run_id)
    directory = path / run.experiment_id / run.run_id / "artifacts" / "weights"
    directory.mkdir(parents=True)
    block = os.urandom(SHARD_MB << 20)
    shards = []
    for i in range(megabytes // SHARD_MB):
        shard = directory / f"shard-{i:03d}.bin"
        shard.write_bytes(block[i:] + block[:i])
        shards.append(shard)
    return path, shards


def raw_artifact_puts(url: str, shards: list[Path]) -> float:
    """The shards PUT to the server's artifact proxy by `UPLOAD_CONCURRENCY` threads; bytes/s."""
    port = urllib.parse.urlparse(url).port
    experiment = post(port, "experiments/create", {"name": f"raw-artifacts-{uuid.uuid4().hex[:8]}"})["experiment_id"]
    run = post(port, "runs/create", {"experiment_id": experiment, "start_time": int(time.time() * 1000)})["run"]["info"]["run_id"]
    queue = list(shards)
    lock = threading.Lock()

    def put():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while True:
            with lock:
                if not queue:
                    break
                shard = queue.pop()
            with open(shard, "rb") as body:
                conn.request("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{experiment}/{run}/artifacts/{shard.name}", body=body,
                             headers={"Content-Length": str(shard.stat().st_size), "Content-Type": "application/octet-stream"})
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
        conn.close()

    threads = [threading.Thread(target=put) for _ in range(UPLOAD_CONCURRENCY)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(s.stat().st_size for s in shards) / (time.monotonic() - start)


def peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def timed_sync(armoryctl: Path, socket: str, url: str, store: Path) -> tuple[float, dict]:
    start = time.monotonic()
    out = subprocess.run([str(armoryctl), "sync", "--to", url, "--from", str(store), "--json", "--socket", socket],
                         capture_output=True, text=True, timeout=3600)
    elapsed = time.monotonic() - start
    if out.returncode != 0:
        raise RuntimeError(f"sync failed: {out.stdout}{out.stderr}")
    return elapsed, json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mlflow", help="an MLflow server to use (default: start one)")
    parser.add_argument("--metrics", type=int, default=200_000)
    parser.add_argument("--artifact-mb", type=int, default=1024, help="0: no artifact figures")
    parser.add_argument("--bin", default=str(ROOT / ".build" / "release"))
    parser.add_argument("--output", default=str(ROOT / "Benchmarks" / "results" / "sync-latest.json"))
    args = parser.parse_args()
    binaries = Path(args.bin)
    with tempfile.TemporaryDirectory(prefix="armory-sync-bench-") as work:
        work = Path(work)
        server = None
        url = args.mlflow
        if url is None:
            (work / "server").mkdir()
            server, url = start_server(work / "server")
        home = work / "daemon"
        home.mkdir()
        socket = str(home / "d.sock")
        daemon = subprocess.Popen([str(binaries / "armoryd"), "--socket", socket, "--home", str(home), "--log-level", "warning",
                                   "--system-metrics-interval", "0"], stdin=subprocess.DEVNULL)
        try:
            while not os.path.exists(socket):
                time.sleep(0.05)
            metrics = metrics_store(work / "metrics-store", args.metrics)
            artifacts, shards = artifact_store(work / "artifact-store", args.artifact_mb)
            port = urllib.parse.urlparse(url).port

            before = raw_log_batch(port, UPLOAD_CONCURRENCY, args.metrics)
            seconds, job = timed_sync(binaries / "armoryctl", socket, url, metrics)
            after = raw_log_batch(port, UPLOAD_CONCURRENCY, args.metrics)
            assert job["metrics_landed"] == args.metrics // RUNS // KEYS * KEYS * RUNS, job
            sync_rate, raw_rate = job["metrics_landed"] / seconds, (before + after) / 2

            resync = resync_figures(binaries / "armoryctl", socket, url, metrics)
            if args.artifact_mb == 0:
                return report(args, url, {"metrics": metrics_result(job, seconds, sync_rate, raw_rate, before, after), "resync": resync})

            rss_before = peak_rss_mb(daemon.pid)
            raw_bytes_before = raw_artifact_puts(url, shards)
            artifact_seconds, artifact_job = timed_sync(binaries / "armoryctl", socket, url, artifacts)
            raw_bytes_after = raw_artifact_puts(url, shards)
            rss_after = peak_rss_mb(daemon.pid)
            bytes_rate, raw_bytes = artifact_job["artifact_bytes_landed"] / artifact_seconds, (raw_bytes_before + raw_bytes_after) / 2
        finally:
            daemon.terminate()
            daemon.wait()
            if server is not None:
                os.killpg(server.pid, 15)
                server.wait()
    report(args, url, {
        "metrics": metrics_result(job, seconds, sync_rate, raw_rate, before, after), "resync": resync,
        "artifacts": {"bytes": artifact_job["artifact_bytes_landed"], "seconds": artifact_seconds, "sync_mb_per_s": bytes_rate / 1e6,
                      "raw_put_mb_per_s": raw_bytes / 1e6, "raw_before_mb_per_s": raw_bytes_before / 1e6, "raw_after_mb_per_s": raw_bytes_after / 1e6,
                      "ratio": bytes_rate / raw_bytes, "daemon_peak_rss_mb_before": rss_before, "daemon_peak_rss_mb_after": rss_after},
    })


def metrics_result(job, seconds, sync_rate, raw_rate, before, after) -> dict:
    print(f"metrics:   sync {sync_rate:8.0f} metrics/s   raw log-batch ({UPLOAD_CONCURRENCY} concurrent) {raw_rate:8.0f} metrics/s "
          f"({before:.0f} before, {after:.0f} after)   {sync_rate / raw_rate:.2f}x")
    return {"points": job["metrics_landed"], "runs": RUNS, "seconds": seconds, "sync_metrics_per_s": round(sync_rate),
            "raw_log_batch_metrics_per_s": round(raw_rate), "raw_before": round(before), "raw_after": round(after),
            "concurrency": UPLOAD_CONCURRENCY, "ratio": sync_rate / raw_rate}


def resync_figures(armoryctl: Path, socket: str, url: str, store: Path) -> dict:
    """The synced store synced again: with the copies' landed records, then without them (the
    baseline: every key's history read, as before the records), then with them again."""
    client = MlflowClient(url)
    source_runs = {r.info.run_id for e in MlflowClient(f"file://{store}").search_experiments() for r in
                   MlflowClient(f"file://{store}").search_runs([e.experiment_id], max_results=RUNS)}
    copies = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], max_results=5000)
              if r.data.tags.get("armory.sync.source_run") in source_runs]
    assert len(copies) == RUNS and all("armory.sync.landed" in r.data.tags for r in copies), len(copies)
    with_records, job = timed_sync(armoryctl, socket, url, store)
    assert job["runs_up_to_date"] == RUNS, job
    for r in copies:
        client.delete_tag(r.info.run_id, "armory.sync.landed")
    without_records, job = timed_sync(armoryctl, socket, url, store)  # reads every history, writes the records back
    assert job["metrics_queued"] == 0 and job["state"] == "complete", job
    again, job = timed_sync(armoryctl, socket, url, store)
    assert job["runs_up_to_date"] == RUNS, job
    print(f"re-sync:   {RUNS} runs x {KEYS} keys, nothing to send: {with_records:.2f} s and {again:.2f} s with landed records, "
          f"{without_records:.2f} s reading every history   {without_records / max(with_records, again):.1f}x")
    return {"runs": RUNS, "keys": KEYS, "with_landed_records_s": [with_records, again], "reading_every_history_s": without_records,
            "ratio": without_records / max(with_records, again)}


def report(args, url: str, figures: dict):
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "server": url if args.mlflow else "private mlflow server, SQLite, 4 workers", **figures}
    if "artifacts" in figures:
        a = figures["artifacts"]
        print(f"artifacts: sync {a['sync_mb_per_s']:8.1f} MB/s      raw PUT ({UPLOAD_CONCURRENCY} concurrent) {a['raw_put_mb_per_s']:8.1f} MB/s "
              f"({a['raw_before_mb_per_s']:.1f} before, {a['raw_after_mb_per_s']:.1f} after)   {a['ratio']:.2f}x; "
              f"daemon peak RSS {a['daemon_peak_rss_mb_before']:.0f} -> {a['daemon_peak_rss_mb_after']:.0f} MB over {a['bytes'] / 1e9:.2f} GB")
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"results: {args.output}")


if __name__ == "__main__":
    main()
