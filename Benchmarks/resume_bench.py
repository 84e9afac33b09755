"""What resumable sessions cost and how fast they resume, one run, one machine:

1. `chain.log_metric` per call (p50/p99 of 200k calls) with this checkout's `armory_track` (it
   keeps every frame until acked) next to the same loop with the client of the commit before
   sessions (`--baseline-rev`, default 5abb6b2), loaded from git into a temporary package: the
   same daemon, the same run, the two alternating three times (medians reported).
2. A restart under load: `--clients` evaluations stream; the daemon gets SIGTERM and starts again;
   per client, the time from the new daemon answering on its socket to that client's session
   resumed (both read on CLOCK_MONOTONIC), and how long its calls took meanwhile.

argv: the armoryd binary; writes JSON to --output."""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CALLS = r'''
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import armory_track
n, rounds = 100_000, 2
evaluation = armory_track.Evaluation("bench-resume-calls")
with evaluation.add_chain("calls") as chain:
    pass
chain.start()
samples = []
for r in range(rounds):
    out = []
    for i in range(n):
        t = time.perf_counter_ns()
        chain.log_metric("m", i * 0.5, step=r * n + i)
        out.append(time.perf_counter_ns() - t)
    armory_track.flush("durable")
    samples.extend(out)
    time.sleep(0.2)
chain.end(); evaluation.end()
samples.sort()
print(json.dumps({"p50_us": samples[len(samples) // 2] / 1000, "p99_us": samples[int(len(samples) * 0.99)] / 1000}))
'''

STREAMER = r'''
import json, sys, threading, time
import armory_track
from armory_track._connection import connection
evaluation = armory_track.Evaluation("bench-resume-" + sys.argv[1])
with evaluation.add_chain("c") as chain:
    pass
chain.start()
c = connection()
resumed_at = []
def watch():
    seen = 0
    while not resumed_at:
        if c.resumes != seen:
            resumed_at.append(time.monotonic())
        time.sleep(0.0005)
threading.Thread(target=watch, daemon=True).start()
print("ready", flush=True)
slowest = 0
step = 0
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    t = time.perf_counter_ns()
    chain.log_metric("m", 1.0, step=step)
    slowest = max(slowest, time.perf_counter_ns() - t)
    step += 1
    if step % 100 == 0:
        time.sleep(0.001)
chain.end(); evaluation.end()
print(json.dumps({"resumed_at": resumed_at[0] if resumed_at else None, "points": step, "slowest_call_ms": slowest / 1e6}), flush=True)
'''


def answers(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def start_daemon(binary, home):
    proc = subprocess.Popen([binary, "--socket", str(home / "d.sock"), "--home", str(home), "--log-level", "warning",
                             "--system-metrics-interval", "0"], stdin=subprocess.DEVNULL)
    while not answers(str(home / "d.sock")):
        time.sleep(0.0005)
    return proc, time.monotonic()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("armoryd")
    parser.add_argument("--baseline-rev", default="5abb6b2")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--output", default=str(ROOT / "Benchmarks" / "results" / "resume-latest.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="armory-resume-bench-"))
    results = {}
    try:
        home = work / "home"
        home.mkdir()
        daemon, _ = start_daemon(args.armoryd, home)
        env = dict({k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}, ARMORY_SOCKET=str(home / "d.sock"))
        # 1. Call cost, this client and the one before sessions (as a package of its own).
        baseline = work / "baseline"
        (baseline / "armory_track").mkdir(parents=True)
        files = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{args.baseline_rev}:clients/python/armory_track"],
                               capture_output=True, text=True, check=True).stdout.split()
        for name in files:
            (baseline / "armory_track" / name).write_bytes(subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{args.baseline_rev}:clients/python/armory_track/{name}"], capture_output=True, check=True).stdout)
        samples = {"without_retention": [], "with_retention": []}
        for _ in range(3):  # alternating, so that the machine's drift falls on both alike
            for label, path in (("without_retention", baseline), ("with_retention", ROOT / "clients" / "python")):
                out = subprocess.run([sys.executable, "-c", CALLS, str(path)], capture_output=True, text=True, env=env, check=True)
                samples[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for label, runs in samples.items():
            results[label] = {key: sorted(r[key] for r in runs)[1] for key in ("p50_us", "p99_us")}
            results[label]["p50_each_us"] = [r["p50_us"] for r in runs]
        results["p50_ratio"] = round(results["with_retention"]["p50_us"] / results["without_retention"]["p50_us"], 3)
        # 2. A restart under load.
        procs = [subprocess.Popen([sys.executable, "-c", STREAMER, str(i), "6"], stdout=subprocess.PIPE, text=True, env=env)
                 for i in range(args.clients)]
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        time.sleep(1.5)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait()
        daemon, ready_at = start_daemon(args.armoryd, home)
        resumes = []
        for p in procs:
            r = json.loads(p.stdout.readline())
            p.wait()
            resumes.append(r)
        delays = sorted(round((r["resumed_at"] - ready_at) * 1000, 1) for r in resumes if r["resumed_at"])
        results["restart"] = {"clients": args.clients, "resumed": len(delays), "ready_to_resumed_ms": delays,
                              "slowest_call_during_outage_ms": round(max(r["slowest_call_ms"] for r in resumes), 2)}
        daemon.send_signal(signal.SIGTERM)
        daemon.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
