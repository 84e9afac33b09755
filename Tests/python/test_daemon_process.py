"""armoryd as a process: socket mode, a second daemon refused, SIGTERM drains and exits 0, status CLI."""
import json
import os
import stat
import subprocess

from conftest import BIN, Daemon, RawClient, log_steps


def test_socket_is_private(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600


def test_second_daemon_on_the_same_socket_refuses_to_start(daemon, tmp_path):
    out = subprocess.run([str(BIN / "armoryd"), "--socket", daemon.socket, "--home", str(tmp_path / "other")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "already serving" in out.stderr and daemon.socket in out.stderr


def test_sigterm_writes_what_was_accepted_and_exits_zero(tmp_path):
    d = Daemon(tmp_path)
    client, _ = log_steps(d.socket, "sigterm", 2000)
    client.request("flush", wait="durable", timeout_ms=10000)
    assert d.stop() == 0
    assert not os.path.exists(d.socket)
    lines = next(d.store.rglob("metrics/m")).read_text().splitlines()
    assert len(lines) == 2000


def test_armoryctl_status_text_json_and_exit_codes(daemon):
    env = daemon.env()
    text = subprocess.run([str(BIN / "armoryctl"), "status"], env=env, capture_output=True, text=True, timeout=30)
    assert text.returncode == 0, text.stderr
    assert "running" in text.stdout and daemon.socket in text.stdout
    js = subprocess.run([str(BIN / "armoryctl"), "status", "--json"], env=env, capture_output=True, text=True, timeout=30)
    status = json.loads(js.stdout)
    for key in ("state", "pid", "version", "uptime_s", "socket", "destination", "clients", "active_runs", "pending_records"):
        assert key in status
    assert status["pid"] == daemon.proc.pid
    assert status["destination"] == daemon.store_uri
    gone = subprocess.run([str(BIN / "armoryctl"), "status", "--socket", daemon.socket + ".nope"], capture_output=True, text=True, timeout=30)
    assert gone.returncode == 3
    assert "No armoryd is listening" in gone.stderr


def test_example_without_a_daemon_fails_clearly(tmp_path):
    env = dict(os.environ, ARMORY_SOCKET=str(tmp_path / "none.sock"))
    out = subprocess.run([str(BIN / "armory-example")], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 3
    assert str(tmp_path / "none.sock") in out.stderr and "armoryd &" in out.stderr


def test_armoryctl_answers_every_time(daemon):
    """Regression: a Swift 6.3.1 miscompile once turned armoryctl's `.status` request into another
    op in about 1 process in 10; armoryctl now asks through `Connection.status()`."""
    env = daemon.env()
    failures = [subprocess.run([str(BIN / "armoryctl"), "status", "--json"], env=env, capture_output=True, text=True, timeout=30)
                for _ in range(60)]
    bad = [f.stderr for f in failures if f.returncode != 0]
    assert not bad, bad[:3]


def test_null_destination_journals_and_discards(tmp_path):
    """`--tracking-uri null:` (the benchmarks' null sink): frames are acked, counted as written
    and settled, and nothing reaches a store."""
    d = Daemon(tmp_path, args=("--tracking-uri", "null:"))
    client, _ = log_steps(d.socket, "discarded", 500)
    client.request("end", evaluation=1, status="FINISHED")
    reply = client.request("flush", wait="uploaded", timeout_ms=10000)
    assert reply["complete"] is True
    status = d.status()
    assert status["destination"].startswith("null:")
    assert status["metrics_written"] == 500 and status["pending_records"] == 0
    assert not d.store.exists()
    client.close()
    assert d.stop() == 0
