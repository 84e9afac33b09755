"""Credentials that change (issue 23): a 401 or 403 means "wait for credentials", never "drop".
The tracking user's password is changed on a real `mlflow server --app-name basic-auth` (MLflow's
auth REST API) mid-stream; records wait (`needs-credentials`), the client is warned (durable) or
refused with AUTH_REQUIRED (uploaded), and once new credentials arrive (the credentials file and
SIGHUP, or a client that names the server with them) every record lands, exactly once, counted at
a proxy in front of the server."""
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import requests
from mlflow.tracking import MlflowClient

from conftest import AUTH_PASSWORD, Daemon, RawClient, start_chain, wait_for
from faultproxy import FaultProxy

BASE_TS = 1795600000000
ADMIN = ("admin", AUTH_PASSWORD)


def make_user(server) -> str:
    """A fresh admin user of the auth server (so it may create experiments); returns its name."""
    name = "tracker-" + uuid.uuid4().hex[:8]
    response = requests.post(f"{server.url}/api/2.0/mlflow/users/create", json={"username": name, "password": "first-Password-1"}, auth=ADMIN, timeout=30)
    response.raise_for_status()
    requests.patch(f"{server.url}/api/2.0/mlflow/users/update-admin", json={"username": name, "is_admin": True}, auth=ADMIN, timeout=30).raise_for_status()
    return name


def change_password(server, user: str, password: str):
    requests.patch(f"{server.url}/api/2.0/mlflow/users/update-password", json={"username": user, "password": password}, auth=ADMIN, timeout=30).raise_for_status()


def log_frames(client, handle, first, count):
    for frame in range(first, first + count):
        client.send("log", run=handle, metrics=[["m", float(k), frame * 100 + k, BASE_TS + frame * 100 + k] for k in range(100)])


def stream_until_refused(client, server, proxy, daemon, user, evaluation, frames):
    """Starts a chain, lands `frames` frames, changes the user's password on the server, logs as
    many again and waits until the destination needs credentials; returns the run id."""
    run = start_chain(client, "rotated", evaluation=evaluation)
    log_frames(client, run["handle"], 0, frames)
    assert client.request("flush", wait="uploaded", timeout_ms=30000)["complete"]
    run_id = client.request("run_info", run=run["handle"])["run_id"]
    change_password(server, user, "second-Password-2")
    log_frames(client, run["handle"], frames, frames)
    assert wait_for(lambda: destination_state(daemon, proxy.url) == "needs-credentials")
    return run_id


def destination_state(daemon, url):
    return next(d["state"] for d in daemon.status()["destinations"] if d["destination"].startswith(url))


def assert_landed_once(server, proxy, run_id, points):
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = ADMIN
    try:
        history = MlflowClient(tracking_uri=server.url).get_metric_history(run_id, "m")
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    assert sorted(m.step for m in history) == list(range(points))
    counts = [n for (run, _key, _step, _ts), n in proxy.points.items() if run == run_id]
    assert len(counts) == points and set(counts) == {1}  # every point forwarded (and accepted) once


@pytest.fixture
def auth_proxy(mlflow_auth_server):
    proxy = FaultProxy(mlflow_auth_server.port)
    yield proxy
    proxy.close()


def test_a_changed_password_waits_for_the_credentials_file_and_sighup(tmp_path, mlflow_auth_server, auth_proxy):
    server, proxy = mlflow_auth_server, auth_proxy
    user = make_user(server)
    home = tmp_path / "daemon"
    home.mkdir()
    credentials = home / "credentials"
    credentials.write_text(f"[{proxy.url}]\nmlflow_tracking_username = {user}\nmlflow_tracking_password = first-Password-1\n")
    daemon = Daemon(home, env={"MLFLOW_TRACKING_URI": proxy.url}, args=("--flush-interval", "0.1"))
    try:
        c = RawClient(daemon.socket)
        c.hello()
        run_id = stream_until_refused(c, server, proxy, daemon, user, "credentials-file", frames=10)
        status = daemon.status()
        assert [r["upload"] for r in status["active_runs"]] == ["needs-credentials"] * 2  # the evaluation's run and its chain
        assert "second-Password-2" not in str(status) and "first-Password-1" not in str(status)
        durable = c.request("flush", wait="durable", timeout_ms=10000)
        assert durable["complete"] and any("401" in w and proxy.url in w for w in durable["warnings"])
        began = time.time()
        with pytest.raises(RuntimeError, match="AUTH_REQUIRED") as refused:
            c.request("flush", wait="uploaded", timeout_ms=60000)
        assert time.time() - began < 5 and "credentials" in str(refused.value)
        # The Python client: its evaluation goes on with a warning at the sync point (records are
        # safe), and fails with AUTH_REQUIRED where it waits for uploads.
        script = ("import warnings\nfrom armory_track import Evaluation\nwarnings.simplefilter('always')\n"
                  "evaluation = Evaluation('credentials-python')\n"
                  "with evaluation.add_chain('c') as chain: pass\n"
                  "with evaluation.run(), chain.run():\n    chain.log_metric('x', 1.0)\nprint('finished')\n")
        env = dict(daemon.env(), ARMORY_EXIT_FLUSH_SECONDS="5")
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "finished" in out.stdout, out.stderr
        assert "ArmoryWarning" in out.stderr and "401" in out.stderr and out.stderr.count("ArmoryWarning") == 1
        out = subprocess.run([sys.executable, "-c", script], env=dict(env, ARMORY_WAIT_UPLOAD="30"), capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "AUTH_REQUIRED" in out.stderr
        log = (home / "armoryd.log").read_text()
        assert "needs credentials" in log and proxy.url in log

        credentials.write_text(f"[{proxy.url}/]\nmlflow_tracking_username = {user}\nmlflow_tracking_password = second-Password-2\n")
        os.kill(daemon.proc.pid, signal.SIGHUP)
        assert wait_for(lambda: destination_state(daemon, proxy.url) != "needs-credentials")
        assert c.request("flush", wait="uploaded", timeout_ms=60000)["complete"]
        assert destination_state(daemon, proxy.url) == "running"
        assert_landed_once(server, proxy, run_id, 2000)
        assert wait_for(lambda: daemon.status()["pending_records"] == 0)  # the Python evaluations' records land too
        assert daemon.status()["dead_letters"] == 0
        c.close()
    finally:
        daemon.stop()


def test_a_changed_password_waits_for_a_client_that_brings_the_new_one(tmp_path, mlflow_auth_server, auth_proxy):
    server, proxy = mlflow_auth_server, auth_proxy
    user = make_user(server)
    daemon = Daemon(tmp_path / "daemon", args=("--flush-interval", "0.1"))  # its own store; clients name the server
    try:
        c = RawClient(daemon.socket)
        c.request("hello", protocol=1, client="pytest", tracking_uri=proxy.url, credentials={"username": user, "password": "first-Password-1"})
        run_id = stream_until_refused(c, server, proxy, daemon, user, "credentials-client", frames=5)
        # Another process of the same user, with the new password: the waiting records go with it.
        other = RawClient(daemon.socket)
        other.request("hello", protocol=1, client="pytest", tracking_uri=proxy.url, credentials={"username": user, "password": "second-Password-2"})
        assert c.request("flush", wait="uploaded", timeout_ms=60000)["complete"]
        assert_landed_once(server, proxy, run_id, 1000)
        assert len([d for d in daemon.status()["destinations"] if d["destination"].startswith(proxy.url)]) == 1  # one journal, not two
        other.close()
        c.close()
    finally:
        daemon.stop()
