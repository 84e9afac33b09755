"""Sessions outlive connections: evaluations streaming through `armory_track` (with unchanged MLflow
scripts through `armoryd://` and Swift `armory-example`s) while the daemon is restarted (SIGTERM, then kill -9, then SIGTERM and a restart onto another build) all exit 0 with their runs FINISHED, every metric point lands
exactly once (counted at a proxy in front of the real MLflow server, and as lines of the local
store's files) and every artifact is byte-identical. Then the edges: a resume of an unknown
session, another uid's resume, garbage in `resume`, a re-sent request, a daemon that never comes
back."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, OTHER_BIN, Daemon, RawClient

HERE = Path(__file__).resolve().parent
POINTS = 20000
_started: list = []


def start_daemon(*args, **kwargs) -> Daemon:
    """A daemon that is stopped after the test whatever happens (a restart replaces the one the
    test holds, so a failure mid-way would leave the new one running)."""
    daemon = Daemon(*args, **kwargs)
    _started.append(daemon)
    return daemon


_spawned: list = []


def spawn(args, **kwargs) -> subprocess.Popen:
    """A client process that is killed after the test if it is still running (a failed test
    would otherwise leave it retrying for its whole reconnect budget)."""
    proc = subprocess.Popen(args, **kwargs)
    _spawned.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _stop_what_the_test_started():
    yield
    while _spawned:
        proc = _spawned.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while _started:
        _started.pop().stop()


def start_clients(daemon, workdir: Path, count: int, artifact_mb: float, env_extra=None):
    env = dict(daemon.env(), **(env_extra or {}))
    procs = []
    for i in range(count):
        procs.append(spawn(
            [sys.executable, str(HERE / "resume_client.py"), "--name", f"c{i}", "--points", str(POINTS), "--seconds", "8",
             "--artifact-mb", str(artifact_mb), "--workdir", str(workdir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    return procs


def restart(daemon: Daemon, how: str, env=None, args=(), binary: Path = BIN) -> Daemon:
    if how == "kill":
        daemon.kill()
    else:
        assert daemon.stop() == 0
    return start_daemon(daemon.home, env=env, args=args, binary=binary)


def other_build() -> Path:
    """The directory of another build of armoryd (an upgrade's new binary): `make test` builds
    the release one; the tests run the debug one."""
    other = OTHER_BIN / "armoryd"
    assert other.exists(), f"{other} is missing: build it with `swift build -c release --product armoryd` (make test does), or name one with ARMORY_OTHER_BIN"
    assert other.read_bytes() != (BIN / "armoryd").read_bytes(), f"{other} is the same build as {BIN / 'armoryd'}"
    return OTHER_BIN


def finish(procs):
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, f"client failed ({p.returncode}): {err[-3000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def start_mlflow_scripts(daemon, tmp_path, count: int):
    """Unchanged MLflow code through `armoryd://`."""
    env = dict(daemon.env(), MLFLOW_TRACKING_URI="armoryd://", MLFLOW_REGISTRY_URI="file://" + str(tmp_path / "registry"))
    return [spawn([sys.executable, str(HERE / "resume_mlflow_client.py"), "--name", f"m{i}", "--points", str(POINTS), "--seconds", "8"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(count)]


def start_swift_examples(daemon, count: int):
    """`armory-example` (Swift `ArmoryTrack`): two chains, each streaming POINTS loss points."""
    return [spawn([str(BIN / "armory-example"), "--points", str(POINTS), "--seconds", "8"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=daemon.env()) for _ in range(count)]


def finish_swift(procs):
    """Each example's chain run ids, from what it prints."""
    runs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, f"armory-example failed ({p.returncode}): {err[-3000:]}"
        runs.append(re.findall(r"chain \w+: run (\w+)", out))
    return runs


def stream_through_restarts(daemon, tmp_path, count, artifact_mb, env=None, args=(), mlflow_scripts=0, swift_examples=0):
    """Clients stream; the daemon gets SIGTERM + restart, then kill -9 + restart, then SIGTERM +
    a restart onto another build of the daemon, mid-stream."""
    binary = other_build()
    procs = start_clients(daemon, tmp_path, count, artifact_mb)
    scripts = start_mlflow_scripts(daemon, tmp_path, mlflow_scripts)
    examples = start_swift_examples(daemon, swift_examples)
    # Every evaluation is connected (and streaming) before the first restart: this is about
    # evaluations that run across restarts, not ones that start during one.
    # (A debug daemon on two cores answers a status in up to 20 s while 24 clients stream.)
    deadline = time.time() + 180
    while len(daemon.status()["clients"]) <= len(procs) + len(scripts) + len(examples):  # status itself is one
        assert time.time() < deadline, "the evaluations did not all connect"
        time.sleep(0.1)
    time.sleep(1)
    daemon = restart(daemon, "term", env=env, args=args)
    time.sleep(2.5)
    daemon = restart(daemon, "kill", env=env, args=args)
    time.sleep(2.5)
    daemon = restart(daemon, "term", env=env, args=args, binary=binary)
    return daemon, finish(procs), finish(scripts), finish_swift(examples)


def test_restarts_under_load_on_the_local_store_lose_and_double_nothing(tmp_path):
    daemon = start_daemon(tmp_path / "home")
    try:
        daemon, results, scripts, examples = stream_through_restarts(daemon, tmp_path, count=12, artifact_mb=20, mlflow_scripts=6, swift_examples=6)
        assert daemon.stop() == 0
        client = MlflowClient(tracking_uri=daemon.store_uri)
        for chains in examples:
            assert len(chains) == 2
            for run_id in chains:
                run = client.get_run(run_id)
                assert run.info.status == "FINISHED"
                lines = (Path(run.info.artifact_uri.removeprefix("file://")).parent / "metrics" / "loss").read_text().splitlines()
                assert sorted(int(line.split()[2]) for line in lines) == list(range(POINTS))
        for r in scripts:
            run = client.get_run(r["run"])
            assert run.info.status == "FINISHED" and run.data.params["batch_size"] == "16"
            lines = (Path(run.info.artifact_uri.removeprefix("file://")).parent / "metrics" / "loss").read_text().splitlines()
            assert sorted(int(line.split()[2]) for line in lines) == list(range(POINTS))
        for r in results:
            chain, parent = client.get_run(r["chain"]), client.get_run(r["parent"])
            assert (chain.info.status, parent.info.status) == ("FINISHED", "FINISHED")
            run_dir = Path(chain.info.artifact_uri.removeprefix("file://")).parent
            lines = (run_dir / "metrics" / "loss").read_text().splitlines()
            assert len(lines) == POINTS, "the file writer doubled or lost lines"
            assert sorted(int(line.split()[2]) for line in lines) == list(range(POINTS))
            assert chain.data.params["batch_size"] == "16" and chain.data.tags["phase"] == "streaming"
            names = [a.path for a in client.list_artifacts(r["chain"])]
            (name,) = [n for n in names if n.endswith(".bin")]
            data = (run_dir / "artifacts" / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == r["sha256"]
    finally:
        daemon.stop()


def test_restarts_under_load_into_a_server_land_every_point_exactly_once(tmp_path, mlflow_server):
    from faultproxy import FaultProxy

    proxy = FaultProxy(mlflow_server.port)
    env = {"MLFLOW_TRACKING_URI": proxy.url}
    daemon = start_daemon(tmp_path / "home", env=env)
    try:
        daemon, results, _, _ = stream_through_restarts(daemon, tmp_path, count=4, artifact_mb=2, env=env)
        deadline = time.time() + 120
        while daemon.status()["pending_records"] and time.time() < deadline:
            time.sleep(0.5)
        client = MlflowClient(tracking_uri=mlflow_server.url)
        for r in results:
            chain = client.get_run(r["chain"])
            assert chain.info.status == "FINISHED" and client.get_run(r["parent"]).info.status == "FINISHED"
            history = client.get_metric_history(r["chain"], "loss")
            assert sorted(m.step for m in history) == list(range(POINTS))
            sent = {k: n for k, n in proxy.points.items() if k[0] == r["chain"] and k[1] == "loss"}
            twice = sorted(k[2] for k, n in sent.items() if n > 1)
            assert len(sent) == POINTS and not twice, f"points reached the server twice: steps {twice[:5]}..{twice[-5:]} ({len(twice)})"
            (tmp_path / r["chain"]).mkdir()
            local = client.download_artifacts(r["chain"], "", str(tmp_path / r["chain"]))
            (path,) = list(Path(local).rglob("*.bin"))
            assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"]
    finally:
        daemon.stop()
        proxy.close()


def test_a_resent_request_is_answered_as_the_first_time_and_resent_frames_are_dropped(daemon):
    c = RawClient(daemon.socket)
    hello = c.hello()
    session = hello["session"]
    assert len(session) == 32 and "resumed" not in hello
    c.send("evaluation", id=1, name="resend")
    c.send("chain", id=2, evaluation=1, name="c")
    first = c.request("start", chain=2)
    c.send("log", run=first["handle"], metrics=[["m", 1.0, 0, 1795400000000]])
    c.request("flush", wait="durable", timeout_ms=5000)
    c.close()

    again = RawClient(daemon.socket)
    again.seq = 100
    reply = again.request("hello", protocol=1, client="pytest", program=__file__, resume={"session": session, "acked": 3})
    assert reply["resumed"] is True and reply["session"] == session and reply["held"] == 6
    # The client resends seq 4 (start) and 5 (log): the same run, and the metric is not logged twice.
    again.seq = 3
    assert again.request("start", chain=2)["handle"] == first["handle"]
    again.send("log", run=first["handle"], metrics=[["m", 1.0, 0, 1795400000000]])
    again.seq = 101
    again.request("end", chain=2, status="FINISHED")
    again.request("end", evaluation=1, status="FINISHED")
    assert again.request("flush", wait="uploaded", timeout_ms=10000)["complete"]
    history = MlflowClient(tracking_uri=daemon.store_uri).get_metric_history(first["run_id"], "m")
    assert len(history) == 1
    run_dir = next(daemon.store.glob(f"*/{first['run_id']}"))
    assert len((run_dir / "metrics" / "m").read_text().splitlines()) == 1


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_session_that_only_said_hello_survives_a_restart(tmp_path, how):
    """A restart may come during a client's first queries (MLflow's `set_experiment`): the session
    is journaled from its `hello` on, so the client resumes it even after a kill -9."""
    daemon = start_daemon(tmp_path)
    c = RawClient(daemon.socket)
    session = c.hello()["session"]
    c.request("flush", wait="durable", timeout_ms=5000)  # a query-like request: nothing to journal
    daemon = restart(daemon, how)
    again = RawClient(daemon.socket)
    again.seq = 10
    reply = again.request("hello", protocol=1, client="pytest", program=__file__, resume={"session": session, "acked": 2})
    assert reply["resumed"] is True and reply["session"] == session, reply
    assert daemon.status()["sessions"]["waiting"] == 0


def test_a_session_lost_before_its_first_commit_starts_again_with_everything_its_client_sent(tmp_path):
    """A kill -9 within one group commit of a `hello`: the daemon never wrote the session down, but
    its client has had nothing acknowledged, so it still holds every frame. The resume starts the
    session again under its id and the client sends them all: the evaluation goes on, nothing lost."""
    from armory_track._connection import Connection

    daemon = start_daemon(tmp_path, args=("--journal-commit-ms", "60000"))
    daemon.status()  # a group commit now: the next one is a minute away
    client = Connection(path=daemon.socket)
    session = client.session
    client.send("param", key="lr", value="0.1")
    client.send("param", key="batch", value="32")
    time.sleep(0.2)  # the daemon has read them (their records wait for the next commit)
    assert client.acked == 0
    daemon = restart(daemon, "kill")
    assert client.request("get_params", timeout=60)["params"] == {"lr": "0.1", "batch": "32"}
    assert client.session == session and client.resumes == 1
    client.flush()
    client.close()
    assert "session started again" in (daemon.home / "armoryd.log").read_text()


EXITING_CLIENT = '''
import os, sys
from armory_track import Evaluation
evaluation = Evaluation("bye-" + sys.argv[1])
with evaluation.add_chain("c") as chain:
    pass
with evaluation.run():
    with chain.run():
        chain.log_metric("m", 1.0, step=0)
if sys.argv[1] == "killed":
    os.kill(os.getpid(), 9)  # no exit handlers: the daemon keeps the session for a resume
'''


def test_a_client_that_exits_ends_its_session_one_that_dies_leaves_it_waiting(daemon, tmp_path):
    """`bye` at exit: the daemon ends the session when the connection closes, instead of keeping
    it `--orphan-grace` for a resume that will not come; a killed client's session waits."""
    script = tmp_path / "exiting.py"
    script.write_text(EXITING_CLIENT)
    done = subprocess.run([sys.executable, str(script), "clean"], env=daemon.env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    deadline = time.time() + 10
    while daemon.status()["sessions"]["ended"] < 2 and time.time() < deadline:  # (status() says bye too)
        time.sleep(0.05)
    sessions = daemon.status()["sessions"]
    assert sessions["ended"] >= 2 and sessions["waiting"] == 0, sessions

    # An admin tool never resumes: its session ends with its connection too.
    subprocess.run([str(BIN / "armoryctl"), "status", "--socket", daemon.socket], capture_output=True, check=True, timeout=60)
    assert daemon.status()["sessions"]["waiting"] == 0

    killed = subprocess.run([sys.executable, str(script), "killed"], env=daemon.env(), capture_output=True, text=True, timeout=60)
    assert killed.returncode == -9, killed.stderr
    time.sleep(0.5)
    sessions = daemon.status()["sessions"]
    assert sessions["waiting"] == 1, sessions

    # Frames after `bye` are still served; a resume clears it (the connection broke after all).
    c = RawClient(daemon.socket)
    session = c.hello()["session"]
    c.send("bye")
    c.send("evaluation", id=1, name="after-bye")
    run_id = c.request("start", evaluation=1)["run_id"]
    c.close()
    again = RawClient(daemon.socket)
    again.seq = 10
    reply = again.request("hello", protocol=1, client="pytest", program=__file__, resume={"session": session, "acked": 0})
    assert reply["resumed"] is False and reply["reason"].startswith("ended"), reply  # not started again
    store = MlflowClient(tracking_uri=daemon.store_uri)
    deadline = time.time() + 10
    while store.get_run(run_id).info.status == "RUNNING" and time.time() < deadline:
        time.sleep(0.1)
    assert store.get_run(run_id).info.status == "FAILED"  # left open: ended at once, as an expired session's


def test_unknown_session_and_garbage_in_resume(daemon):
    c = RawClient(daemon.socket)
    reply = c.request("hello", protocol=1, client="pytest", program=__file__, resume={"session": "0" * 32, "acked": 3})
    assert reply["resumed"] is False and "expired or unknown" in reply["reason"]
    assert reply["session"] != "0" * 32  # a new session: the client says its old one is gone
    # A client that had nothing acknowledged holds every frame it sent: its session starts again.
    fresh = RawClient(daemon.socket)
    reply = fresh.request("hello", protocol=1, client="pytest", program=__file__, resume={"session": "1" * 32, "acked": 0})
    assert reply["resumed"] is True and reply["held"] == 0 and reply["session"] == "1" * 32, reply
    for garbage in ({"session": "not-a-session"}, "abc", {"session": 5}, {"session": "a" * 32, "acked": -1}):
        g = RawClient(daemon.socket)
        with pytest.raises(RuntimeError, match="BAD_REQUEST"):
            g.request("hello", protocol=1, client="pytest", program=__file__, resume=garbage)
        g.close()


RESUME_AS_NOBODY = r'''
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
payload = json.dumps({"op": "hello", "seq": 1, "protocol": 1, "client": "nobody", "program": "x",
                      "resume": {"session": sys.argv[2], "acked": 0}}).encode()
s.sendall(struct.pack(">I", len(payload)) + payload)
buffer = b""
while len(buffer) < 4 or len(buffer) < 4 + struct.unpack(">I", buffer[:4])[0]:
    buffer += s.recv(65536)
print(buffer[4:4 + struct.unpack(">I", buffer[:4])[0]].decode())
'''


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to act as another uid")
def test_another_uid_cannot_resume_a_session():
    shared = tempfile.mkdtemp(prefix="armory-resume-")
    os.chmod(shared, 0o755)
    d = start_daemon(Path(shared), args=("--socket-mode", "666"))
    try:
        c = RawClient(d.socket)
        session = c.hello()["session"]
        c.send("evaluation", id=1, name="mine")
        c.close()
        out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c", RESUME_AS_NOBODY,
                              d.socket, session], capture_output=True, text=True, timeout=30)
        reply = json.loads(out.stdout)
        assert reply["op"] == "error" and reply["code"] == "PERMISSION_DENIED", reply
        # The owner still resumes it.
        again = RawClient(d.socket)
        assert again.request("hello", protocol=1, client="pytest", program=__file__, resume={"session": session, "acked": 0})["resumed"] is True
    finally:
        d.stop()
        shutil.rmtree(shared, ignore_errors=True)


GIVES_UP = r'''
import sys, time
from armory_track import Evaluation
evaluation = Evaluation("gives-up")
with evaluation.add_chain("c") as chain:
    pass
evaluation.start()
chain.start()
print("started", flush=True)
sys.stdin.readline()  # the daemon is stopped now
started = time.monotonic()
for step in range(100):
    chain.log_metric("m", 1.0, step=step)  # returns at once while the daemon is away
try:
    chain.end()
except ConnectionError as e:
    print(f"{time.monotonic() - started:.1f}|{e}", flush=True)
'''


def test_a_client_whose_daemon_never_comes_back_raises_within_its_budget(daemon):
    p = spawn([sys.executable, "-c", GIVES_UP], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(daemon.env(), ARMORY_RECONNECT_SECONDS="3"))
    assert p.stdout.readline().strip() == "started"
    daemon.stop()
    p.stdin.write("\n")
    p.stdin.flush()
    out, err = p.communicate(timeout=60)
    seconds, message = out.strip().split("|", 1)
    assert float(seconds) < 10, out
    assert "did not come back within ARMORY_RECONNECT_SECONDS=3 s" in message and "were not delivered" in message, message


def test_after_a_restart_flush_uploaded_waits_for_what_the_journal_replayed(tmp_path, mlflow_server):
    from faultproxy import FaultProxy

    proxy = FaultProxy(mlflow_server.port)
    env = {"MLFLOW_TRACKING_URI": proxy.url}
    daemon = start_daemon(tmp_path / "home", env=env, args=("--request-timeout", "1"))
    try:
        c = RawClient(daemon.socket)
        session = c.hello()["session"]
        c.send("evaluation", id=1, name="replayed-flush")
        c.send("chain", id=2, evaluation=1, name="c")
        run = c.request("start", chain=2)
        proxy.stop_listening()  # the server is unreachable: the records wait in the journal
        c.send("log", run=run["handle"], metrics=[["m", float(k), k, 1795400000000 + k] for k in range(100)])
        assert c.request("flush", wait="durable", timeout_ms=5000)["complete"]
        daemon.kill()
        daemon = start_daemon(tmp_path / "home", env=env, args=("--request-timeout", "1"))
        again = RawClient(daemon.socket)
        again.seq = 10
        assert again.request("hello", protocol=1, client="pytest", program=__file__, resume={"session": session, "acked": 5})["resumed"]
        reply = again.request("flush", wait="uploaded", timeout_ms=1000)
        assert not reply["complete"], "the replayed records were not waited for"
        proxy.start()
        assert again.request("flush", wait="uploaded", timeout_ms=60000)["complete"]
        run_id = again.request("run_info", run=run["handle"], wait_ms=10000)["run_id"]
        assert len(MlflowClient(tracking_uri=mlflow_server.url).get_metric_history(run_id, "m")) == 100
    finally:
        daemon.stop()
        proxy.close()


EXITS_WHILE_AWAY = r'''
import sys
from armory_track import Evaluation
evaluation = Evaluation("exits-while-away")
with evaluation.add_chain("c") as chain:
    pass
chain.start()
print("started", flush=True)
sys.stdin.readline()  # the daemon is stopped now
chain.log_metric("m", 1.0)
'''


def test_the_flush_at_exit_stays_bounded_while_the_daemon_is_away(daemon):
    p = spawn([sys.executable, "-c", EXITS_WHILE_AWAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(daemon.env(), ARMORY_EXIT_FLUSH_SECONDS="2"))
    assert p.stdout.readline().strip() == "started"
    daemon.stop()
    started = time.monotonic()
    p.stdin.write("\n")
    p.stdin.flush()
    _, err = p.communicate(timeout=60)
    assert time.monotonic() - started < 10, "the exit waited out the reconnect budget (300 s)"
    assert "is away" in err and "were not delivered" in err, err
