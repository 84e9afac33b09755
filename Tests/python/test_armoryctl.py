"""armoryctl as admins use it: status exit codes and its documented JSON, runs, flush --wait,
Prometheus metrics, and MLflow's UI on the local store."""
import json
import os
import re
import subprocess
import threading
import time
import urllib.request

import jsonschema

from conftest import BIN, ROOT, Daemon, RawClient, free_port
from faultproxy import FaultProxy

STATUS_SCHEMA = json.loads((ROOT / "proto" / "schemas" / "status-reply.json").read_text())


def armoryctl(*args, env=None, timeout=60):
    return subprocess.run([str(BIN / "armoryctl"), *args], env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def start_chain(c, name):
    c.send("evaluation", id=1, name=name)
    c.send("chain", id=2, evaluation=1, name="benign")
    c.request("start", evaluation=1)
    return c.request("start", chain=2)


def test_status_json_matches_its_schema_and_runs_lists_the_active_runs(daemon):
    c = RawClient(daemon.socket)
    c.hello()
    run = start_chain(c, "ctl-runs")
    for step in range(100):
        c.send("log", run=run["handle"], metrics=[["m", float(step), step, 1795400000000 + step]])
    c.request("flush", wait="uploaded", timeout_ms=10000)
    out = armoryctl("status", "--json", env=daemon.env())
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    # The status reply of proto/schemas/status-reply.json, without the frame's op and seq.
    jsonschema.validate({"op": "reply", "seq": 1, **status}, STATUS_SCHEMA, cls=jsonschema.Draft202012Validator)
    assert status["metrics_written"] == 100 and status["write_rate_metrics_per_s"] > 0
    runs = json.loads(armoryctl("runs", "--json", env=daemon.env()).stdout)
    assert {r["name"] for r in runs} == {"ctl-runs", "benign"}
    chain = next(r for r in runs if r["name"] == "benign")
    assert chain["run_id"] == run["run_id"] and chain["client_pid"] == os.getpid() and chain["pending_records"] == 0
    text = armoryctl("runs", env=daemon.env()).stdout.splitlines()
    assert text[0].split()[:2] == ["RUN", "ID"] and any(run["run_id"] in line and "connected" in line for line in text)
    shown = armoryctl("status", env=daemon.env()).stdout
    assert "Upload rate" in shown and "Backlog" in shown and daemon.store_uri in shown
    c.close()


def test_prometheus_text(daemon):
    out = armoryctl("metrics", env=daemon.env())
    assert out.returncode == 0, out.stderr
    samples = {}
    for line in out.stdout.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) armoryd_\w+ .+", line), line
            continue
        name, value = line.rsplit(" ", 1)
        assert re.fullmatch(r'armoryd_\w+(\{destination="[^"]*"\})?', name), line
        samples[name] = float(value)
    assert samples["armoryd_up"] == 1 and samples["armoryd_clients"] == 0  # armoryctl is an admin, not a client
    assert samples[f'armoryd_destination_healthy{{destination="{daemon.store_uri}"}}'] == 1


def test_status_exit_codes_degraded_and_not_running(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: MLflow unreachable
    d = Daemon(tmp_path / "d", env={"MLFLOW_TRACKING_URI": dead}, args=("--request-timeout", "1"))
    try:
        c = RawClient(d.socket)
        c.hello()
        start_chain(c, "ctl-degraded")
        deadline = time.time() + 30
        while (out := armoryctl("status", env=d.env())).returncode != 1:
            assert out.returncode == 0 and time.time() < deadline, out.stdout + out.stderr
            time.sleep(0.5)
        assert "degraded" in out.stdout and "unreachable: connection refused" in out.stdout
        # flush --wait gives up at its timeout, with the backlog named.
        waited = armoryctl("flush", "--wait", "--timeout", "2", "--json", env=d.env())
        assert waited.returncode == 1 and json.loads(waited.stdout)["drained"] is False
        c.close()
    finally:
        d.stop()
    gone = armoryctl("status", env=d.env())
    assert gone.returncode == 3 and "No armoryd is listening" in gone.stderr


def test_flush_wait_returns_once_the_backlog_is_uploaded(tmp_path, mlflow_server):
    proxy = FaultProxy(mlflow_server.port)
    d = Daemon(tmp_path / "d", env={"MLFLOW_TRACKING_URI": proxy.url}, args=("--flush-interval", "0.1", "--request-timeout", "2"))
    try:
        proxy.stop_listening()
        c = RawClient(d.socket)
        c.hello()
        run = start_chain(c, "ctl-flush")
        for frame in range(50):
            c.send("log", run=run["handle"], metrics=[["m", float(k), frame * 100 + k, 1795400000000 + k] for k in range(100)])
        c.request("flush", wait="durable", timeout_ms=10000)
        assert json.loads(armoryctl("flush", "--json", env=d.env()).stdout)["pending_records"] > 0
        threading.Timer(3, proxy.start).start()  # the server comes back while armoryctl waits
        started = time.time()
        out = armoryctl("flush", "--wait", "--timeout", "120", "--json", env=d.env(), timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        assert json.loads(out.stdout) == {"pending_records": 0, "drained": True, "seconds": json.loads(out.stdout)["seconds"]}
        assert time.time() - started >= 2.5
        assert d.status()["pending_records"] == 0
        c.close()
    finally:
        d.stop()
        proxy.close()


def test_mlflow_server_serves_the_local_store_or_says_what_is_missing(daemon):
    no_mlflow = dict(daemon.env(), PATH="/usr/bin:/bin")
    missing = armoryctl("mlflow-server", env=no_mlflow)
    assert missing.returncode != 0 and "`mlflow` is not installed" in missing.stderr
    port = free_port()
    env = dict(daemon.env(), PATH=str(ROOT / ".venv" / "bin") + ":" + os.environ["PATH"])
    daemon.store.mkdir(exist_ok=True)
    proc = subprocess.Popen([str(BIN / "armoryctl"), "mlflow-server", "--port", str(port), "--workers", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.read() == b"OK"
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10", timeout=10) as r:
            assert "Default" in r.read().decode()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
