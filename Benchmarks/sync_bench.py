"""`armoryctl sync` throughput into a local `mlflow server` (SQLite, proxied artifacts): metrics/s
next to raw `log-batch` calls at armoryd's upload concurrency (measured before and after the
sync, against the same server), and artifact MB/s next to raw artifact PUTs of the same files.
The source stores are written by MLflow's own client, as a store carried off an offline host.

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
    parser.add_argument("--artifact-mb", type=int, default=1024)
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
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "server": url if args.mlflow else "private mlflow server, SQLite, 4 workers",
        "metrics": {"points": job["metrics_landed"], "runs": RUNS, "seconds": seconds, "sync_metrics_per_s": round(sync_rate),
                    "raw_log_batch_metrics_per_s": round(raw_rate), "raw_before": round(before), "raw_after": round(after),
                    "concurrency": UPLOAD_CONCURRENCY, "ratio": sync_rate / raw_rate},
        "artifacts": {"bytes": artifact_job["artifact_bytes_landed"], "seconds": artifact_seconds, "sync_mb_per_s": bytes_rate / 1e6,
                      "raw_put_mb_per_s": raw_bytes / 1e6, "raw_before_mb_per_s": raw_bytes_before / 1e6, "raw_after_mb_per_s": raw_bytes_after / 1e6,
                      "ratio": bytes_rate / raw_bytes, "daemon_peak_rss_mb_before": rss_before, "daemon_peak_rss_mb_after": rss_after},
    }
    print(f"metrics:   sync {sync_rate:8.0f} metrics/s   raw log-batch ({UPLOAD_CONCURRENCY} concurrent) {raw_rate:8.0f} metrics/s "
          f"({before:.0f} before, {after:.0f} after)   {sync_rate / raw_rate:.2f}x")
    print(f"artifacts: sync {bytes_rate / 1e6:8.1f} MB/s      raw PUT ({UPLOAD_CONCURRENCY} concurrent) {raw_bytes / 1e6:8.1f} MB/s "
          f"({raw_bytes_before / 1e6:.1f} before, {raw_bytes_after / 1e6:.1f} after)   {bytes_rate / raw_bytes:.2f}x; "
          f"daemon peak RSS {rss_before:.0f} -> {rss_after:.0f} MB over {artifact_job['artifact_bytes_landed'] / 1e9:.2f} GB")
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"results: {args.output}")


if __name__ == "__main__":
    main()
