"""Bad input as users and client authors meet it: every bad call gets a clear error at once (at the
call when it can be known there, else at the next sync point), nothing hangs, the daemon serves
everyone else on, armoryctl follows the conventions people's hands know, and status tells the truth."""
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, Daemon, RawClient, log_steps

MiB = 1 << 20


def python(daemon, body, timeout=60, env=None):
    """Runs `body` in a Python process of its own against `daemon` (armory_track imported)."""
    script = "import time\nfrom armory_track import ArmoryError, Evaluation, track_param, track_params\n" + textwrap.dedent(body)
    started = time.time()
    out = subprocess.run([sys.executable, "-c", script], env={**daemon.env(), **(env or {})}, capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    return out, time.time() - started


def armoryctl(*args, env=None, timeout=60):
    return subprocess.run([str(BIN / "armoryctl"), *args], env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def runs_by_name(daemon, experiment):
    client = MlflowClient(tracking_uri=daemon.store_uri)
    found = client.get_experiment_by_name(experiment)
    return client, {r.info.run_name: r for r in client.search_runs([found.experiment_id])}


# -- 1, 2: oversize params are handled at the call as MLflow does; the rest of the connection lands


def test_a_10_mb_param_then_log_metric_is_truncated_with_a_warning_as_mlflow_does_and_everything_lands(daemon):
    out, seconds = python(daemon, """
        evaluation = Evaluation("big-param")
        track_param("small", 1)
        with evaluation.add_chain("chain") as chain:
            pass
        track_param("big", "x" * 10_000_000)
        with evaluation.run():
            with chain.run():
                chain.log_param("huge", "y" * 10_000_000)
                chain.set_tag("note", "t" * 10_000)
                chain.log_param("lr", 0.1)
                for step in range(100):
                    chain.log_metric("acc", step / 100, step=step)
        print("done")
    """, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done" and seconds < 30
    for key, size, limit in (("big", 10_000_000, 6000), ("huge", 10_000_000, 6000), ("note", 10_000, 8000)):
        assert f"'{key}' has a value of {size} characters: truncated to MLflow's limit of {limit}" in out.stderr, out.stderr
    client, runs = runs_by_name(daemon, "big-param")
    assert {name: r.info.status for name, r in runs.items()} == {"big-param": "FINISHED", "chain": "FINISHED"}
    assert runs["big-param"].data.params == {"small": "1", "big": "x" * 6000}
    assert runs["chain"].data.params == {"huge": "y" * 6000, "lr": "0.1"}
    assert runs["chain"].data.tags["note"] == "t" * 8000
    assert len(client.get_metric_history(runs["chain"].info.run_id, "acc")) == 100


def test_with_truncation_off_an_oversize_value_raises_at_the_call_naming_the_key_and_the_limit(daemon):
    out, _ = python(daemon, """
        evaluation = Evaluation("no-truncation")
        with evaluation.add_chain("chain") as chain:
            pass
        for call in (lambda: track_param("big", "x" * 10_000_000), lambda: chain.log_param("huge", "y" * 6001),
                     lambda: chain.set_tag("note", "t" * 8001)):
            try:
                call()
            except ArmoryError as e:
                print(e.errors[0]["code"], e.errors[0]["key"], "MLflow allows at most" in str(e), e.errors[0]["seq"])
        with evaluation.run(), chain.run():
            chain.log_metric("ok", 1.0)
        print("done")
    """, env={"MLFLOW_TRUNCATE_LONG_VALUES": "false"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["INVALID_VALUE big True None", "INVALID_VALUE huge True None", "INVALID_VALUE note True None", "done"]


def test_a_frame_over_the_daemons_limit_is_refused_at_the_call_with_the_limit_and_the_fix(daemon):
    out, _ = python(daemon, """
        evaluation = Evaluation("big-frame")
        with evaluation.add_chain("chain") as chain:
            pass
        # 2000 values of 5000 characters: each within MLflow's limit, 10 MB together.
        def configure(**kwargs):
            return kwargs
        try:
            track_params(configure, prefix="model")(**{f"w{i}": "z" * 5000 for i in range(2000)})
        except ArmoryError as e:
            print(e.errors[0]["code"], e.errors[0]["failed_op"], "8388608" in str(e), "artifact" in str(e))
        for bad in ("bad key!", "a" * 251, "/leading", "a//b"):
            try:
                chain.log_param(bad, 1)
            except ArmoryError as e:
                print(e.errors[0]["code"], e.errors[0]["key"] == bad)
        with evaluation.run():
            with chain.run():
                chain.log_metric("ok", 1.0)
        print("done")
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["FRAME_TOO_LARGE params True True"] + ["INVALID_KEY True"] * 4 + ["done"]


# -- 3: logging after the end ----------------------------------------------------------------


def test_logging_to_an_ended_chain_is_invalid_state_at_the_next_sync_point(daemon):
    out, _ = python(daemon, """
        evaluation = Evaluation("after-end")
        with evaluation.add_chain("chain") as chain:
            pass
        with evaluation.run():
            with chain.run():
                chain.log_metric("acc", 0.5)
            chain.log_metric("acc", 0.7)  # after the chain ended
            try:
                evaluation.wait_uploaded(10)
            except ArmoryError as e:
                print(e.errors[0]["code"], e.errors[0]["failed_op"], e.errors[0]["key"], "already ended" in str(e))
        print("done")
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["INVALID_STATE log acc True", "done"]
    client, runs = runs_by_name(daemon, "after-end")
    assert [m.value for m in client.get_metric_history(runs["chain"].info.run_id, "acc")] == [0.5]


# -- 4: armoryctl's conventions --------------------------------------------------------------

COMMANDS = [["status"], ["runs"], ["flush"], ["metrics"], ["sync", "--status"], ["stop"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_every_armoryctl_command_without_a_daemon_with_a_wrong_socket_a_bad_flag_and_json(command, tmp_path):
    missing = str(tmp_path / "none.sock")
    env = dict(os.environ, ARMORY_SOCKET=missing)
    no_daemon = armoryctl(*command, env=env)
    assert no_daemon.returncode == 3 and "No armoryd is listening" in no_daemon.stderr and missing in no_daemon.stderr
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("")
    wrong = armoryctl("--socket", str(not_a_socket), *command)  # a global option before the command
    assert wrong.returncode == 3 and str(not_a_socket) in wrong.stderr
    bad_flag = armoryctl(*command, "--frobnicate", env=env)
    assert bad_flag.returncode == 64 and "--frobnicate" in bad_flag.stderr
    bad_flag_json = armoryctl(*command, "--frobnicate", "--json", env=env)
    assert bad_flag_json.returncode == 64 and "--frobnicate" in json.loads(bad_flag_json.stdout)["error"]
    as_json = armoryctl("--json", *command, env=env)
    assert as_json.returncode == 3
    assert json.loads(as_json.stdout)["state"] == "not running"


def test_global_options_go_before_or_after_the_command_and_unknown_commands_list_the_commands(daemon):
    for args in (["--socket", daemon.socket, "status"], ["status", "--socket", daemon.socket], [f"--socket={daemon.socket}", "--json", "runs"],
                 ["--socket", daemon.socket, "metrics"], ["--socket", daemon.socket]):
        out = armoryctl(*args)
        assert out.returncode == 0, (args, out.stderr)
        assert "USAGE" not in out.stdout.upper() + out.stderr.upper(), args
    assert json.loads(armoryctl("--socket", daemon.socket, "--json", "runs").stdout) == []
    unknown = armoryctl("frobnicate", env=daemon.env())
    assert unknown.returncode == 64 and "unknown command 'frobnicate'" in unknown.stderr
    for command in ("status", "runs", "flush", "sync", "metrics", "mlflow-server", "stop"):
        assert f"\n  {command} " in unknown.stderr
    negative = armoryctl("flush", "--wait", "--timeout", "-5", env=daemon.env())
    assert negative.returncode == 64 and "--timeout must be a number of seconds, 0 or more (got -5)" in negative.stderr
    port = armoryctl("mlflow-server", "--port", "70000", env=daemon.env())
    assert port.returncode == 64 and "--port must be a TCP port, 1-65535 (got 70000)" in port.stderr
    no_mlflow = armoryctl("mlflow-server", "--store", str(daemon.home), env=dict(daemon.env(), PATH="/usr/bin:/bin"))
    assert no_mlflow.returncode == 1 and "`mlflow` is not installed" in no_mlflow.stderr and "Usage" not in no_mlflow.stderr


def test_armoryctl_stop_stops_a_daemon_started_by_hand_and_points_to_systemctl_for_a_unit(tmp_path):
    d = Daemon(tmp_path / "hand")
    stopped = armoryctl("stop", env=d.env())
    assert stopped.returncode == 0 and f"armoryd (pid {d.proc.pid}) stopped" in stopped.stdout
    assert d.proc.wait(timeout=5) == 0
    d.stop()
    unit = Daemon(tmp_path / "unit", env={"INVOCATION_ID": "0" * 32})  # what systemd sets for a service
    try:
        refused = armoryctl("stop", env=unit.env())
        assert refused.returncode == 1 and "systemctl" in refused.stderr and "stop armoryd.service" in refused.stderr
        as_json = armoryctl("stop", "--json", env=unit.env())
        assert as_json.returncode == 1 and "systemctl" in json.loads(as_json.stdout)["error"]
        assert unit.proc.poll() is None
    finally:
        unit.stop()


# -- 5: messages in the user's terms; nothing created by a refused start -----------------------


def start_daemon(*args, timeout=30):
    return subprocess.run([str(BIN / "armoryd"), *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_start_errors_name_the_path_and_the_fix_and_create_nothing(daemon, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        (["--socket", str(tmp_path / "missing" / "d.sock"), "--home", str(tmp_path / "h1")], "the directory " + str(tmp_path / "missing") + " does not exist", "h1"),
        (["--socket", str(a_file / "d.sock"), "--home", str(tmp_path / "h2")], str(a_file) + " is a file, not a directory", "h2"),
        (["--socket", daemon.socket, "--home", str(tmp_path / "h3")], "already serving " + daemon.socket, "h3"),
        (["--socket", str(tmp_path / "s4.sock"), "--home", str(a_file / "home")], str(a_file) + " is a file, not a directory", None),
    ]
    for args, words, home in cases:
        out = start_daemon(*args)
        assert out.returncode != 0, args
        assert words in out.stderr, out.stderr
        for internal in ("NSCocoaErrorDomain", "bind(descriptor", "errno:", "Error Domain"):
            assert internal not in out.stderr, out.stderr
        if home:
            assert not (tmp_path / home).exists(), f"a refused start created {home}"
    assert not (tmp_path / "missing").exists()


# -- 6: status tells the truth -----------------------------------------------------------------


def test_status_counts_refusals_shows_the_last_one_and_splits_written_metrics(tmp_path):
    d = Daemon(tmp_path / "d", args=("--system-metrics-interval", "0.3"))
    try:
        c, _ = log_steps(d.socket, "truth", 50)
        for bad in ("bad key!", "a//b", "/x", ""):
            c.send("param", key=bad, value="1")
        time.sleep(1.2)
        c.request("end", evaluation=1, status="FINISHED")
        c.request("flush", wait="uploaded", timeout_ms=10000)
        out = armoryctl("status", "--json", env=d.env())
        status = json.loads(out.stdout)
        assert status["clients"] == [{"connection": status["clients"][0]["connection"], "uid": os.getuid(), "pid": os.getpid(),
                                      "client": "pytest ", "program": status["clients"][0]["program"]}]  # armoryctl is not listed
        assert status["errors_sent"] == 4
        last = status["last_refusal"]
        assert (last["code"], last["op"], last["uid"], last["pid"]) == ("INVALID_KEY", "param", os.getuid(), os.getpid())
        assert status["metrics_written"] - status["metrics_written_system"] == 50 and status["metrics_written_system"] > 0
        text = armoryctl("status", env=d.env()).stdout
        assert "Refused: 4 client operations" in text
        assert f"INVALID_KEY in 'param' to pid {os.getpid()} (uid {os.getuid()})" in text
        assert f"(50 from clients, {status['metrics_written_system']} system/… host metrics)" in text
        prometheus = armoryctl("metrics", env=d.env()).stdout
        assert "armoryd_clients 1\n" in prometheus and "armoryd_errors_sent_total 4\n" in prometheus
        assert "# HELP armoryd_metrics_written_system_total" in prometheus
        c.close()
    finally:
        d.stop()


def test_mlflow_server_does_not_hand_its_daemon_connection_to_mlflow(daemon, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    listing = tmp_path / "fds"
    (fake / "mlflow").write_text(f"#!/bin/sh\nls -l /proc/$$/fd > {listing}\nexec sleep 30\n")
    (fake / "mlflow").chmod(0o755)
    daemon.store.mkdir(exist_ok=True)
    proc = subprocess.Popen([str(BIN / "armoryctl"), "mlflow-server", "--port", "5999"], env=dict(daemon.env(), PATH=f"{fake}:/usr/bin:/bin"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while not listing.exists() or not listing.read_text():
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.1)
        assert "socket:" not in listing.read_text()
        assert [c["client"] for c in daemon.status()["clients"]] == ["pytest "]  # the status query's own connection
    finally:
        proc.kill()
        proc.wait()


# -- 7: the protocol says exactly what happens ------------------------------------------------


def raw_frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def test_an_oversize_or_broken_frame_gets_its_seq_and_op_and_the_connection_goes_on(daemon):
    c = RawClient(daemon.socket)
    c.hello()
    c.send("evaluation", id=1, name="frames")  # seq 2
    big = json.dumps({"op": "param", "key": "blob", "value": "v" * (9 * MiB), "seq": 3}).encode()
    c.sock.sendall(raw_frame(big))
    c.sock.sendall(raw_frame(b'{"op":"param","seq":4,"key":'))
    c.sock.sendall(raw_frame(b"garbage"))
    c.seq = 5
    status_seq = c.send("status")
    answers = []
    while True:
        m = c.recv()
        if m["op"] == "ack":
            continue
        answers.append(m)
        if m.get("seq") == status_seq:
            break
    errors = [(m["code"], m["seq"], m["failed_op"]) for m in answers if m["op"] == "error"]
    assert errors == [("FRAME_TOO_LARGE", 3, "param"), ("BAD_JSON", 4, "param"), ("BAD_JSON", 5, None)]
    assert "8388608" in answers[0]["message"] and "skipped" in answers[0]["message"]
    assert answers[-1]["op"] == "reply"
    # Every error names its op (null when unreadable) and, where there is one, its key.
    c.send("param", key="bad key!", value="1")
    refused = c.recv()
    while refused["op"] == "ack":
        refused = c.recv()
    assert refused["key"] == "bad key!" and refused["failed_op"] == "param"
    c.close()


def test_a_flush_uploaded_is_answered_after_the_ack_that_covers_it(daemon):
    c, _ = log_steps(daemon.socket, "ack-order", 200)
    flush_seq = c.send("flush", wait="uploaded", timeout_ms=10000)
    acked = 0
    while True:
        m = c.recv()
        if m["op"] == "ack":
            acked = max(acked, m["upto"])
        elif m.get("seq") == flush_seq:
            assert m["op"] == "reply" and m["complete"] is True
            break
    assert acked >= flush_seq
    c.close()


def test_an_unsupported_protocol_is_answered_with_the_hellos_seq_then_closed(daemon):
    c = RawClient(daemon.socket)
    c.send("hello", protocol=99, client="future")
    error = c.recv()
    assert (error["code"], error["seq"], error["failed_op"]) == ("UNSUPPORTED_PROTOCOL", 1, "hello")
    with pytest.raises(EOFError):
        c.recv()


def test_a_length_far_beyond_the_limit_is_not_an_armoryd_client_and_closes_with_the_error_first(daemon):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(daemon.socket)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    c = RawClient(connected=s)
    error = c.recv()
    assert error["code"] == "FRAME_TOO_LARGE" and "does not look like an armoryd client" in error["message"]
    with pytest.raises(EOFError):
        c.recv()
    assert daemon.status()["state"] == "running"


# -- fuzz: 1,000 random calls through armory_track ---------------------------------------------

FUZZ_CLIENT = r'''
import json, random, sys, threading, time
from armory_track import ArmoryError, Evaluation, track_param

seed, threads, calls = int(sys.argv[1]), 4, 240
SIZES = [0, 10, 6000, 6001, 8000, 8001, 100_000, 9_000_000, 16_000_000]
evaluation = Evaluation("fuzz")
chains = []
for t in range(threads):
    with evaluation.add_chain(f"t{t}") as chain:
        pass
    chains.append(chain)
results = []
deferred = []
lock = threading.Lock()


def key(r, name):
    return r.choice([name, name + " x", name + "/y", name + ".z:w-v", "bad key!" + name, "", "a" * 251, "/" + name, name + "//b", name + "/"])


def worker(t):
    try:
        calls_of(t)
    except ArmoryError as e:  # the sync point at a chain's end raises what other threads sent after theirs
        with lock:
            deferred.extend(e.errors)


def calls_of(t):
    r = random.Random(seed * 100 + t)
    chain = chains[t]
    out = []
    with lock:
        results.append(out)
    with chain.run():
        for i in range(calls):
            op = r.choice(["metric", "metric", "metric", "param", "tag", "global"])
            k = key(r, f"{op}{t}-{i}")
            started = time.monotonic()
            value = None
            try:
                if op == "metric":
                    number = r.choice([r.random(), float("nan"), float("inf"), float("-inf"), 1e308, -0.0])
                    value = repr(number)
                    chain.log_metric(k, number, step=i)
                else:
                    value = r.choice(SIZES)
                    if op == "param":
                        chain.log_param(k, "p" * value)
                    elif op == "tag":
                        chain.set_tag(k, "t" * value)
                    else:
                        track_param(k, "g" * value)
                outcome = "ok"
            except ArmoryError as e:
                outcome = e.errors[0]["code"]
            out.append({"thread": t, "op": op, "key": k, "value": value, "outcome": outcome, "seconds": time.monotonic() - started})
    for i in range(10):  # after the chain's end: refused at the next sync point
        chain.log_metric(f"late{t}", 1.0, step=i)


with evaluation.run():
    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    started = time.monotonic()
    try:
        evaluation.wait_uploaded(60)
    except ArmoryError as e:
        deferred.extend(e.errors)
    sync_seconds = time.monotonic() - started
print(json.dumps({"results": [r for out in results for r in out], "deferred": deferred, "sync_seconds": sync_seconds,
                  "runs": {c.name: c.run_id for c in chains}, "parent": evaluation.run_id}))
'''


@pytest.mark.parametrize("seed", [1, 2])
def test_a_thousand_random_calls_each_land_or_raise_a_clear_error_within_their_bound(daemon, seed):
    out = subprocess.run([sys.executable, "-c", FUZZ_CLIENT, str(seed)], env=daemon.env(), capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    report = json.loads(out.stdout.splitlines()[-1])
    results = report["results"]
    assert len(results) == 960
    # Each call returned within its bound, and each refusal was one MLflow or the daemon would make.
    assert max(r["seconds"] for r in results) < 5, max(results, key=lambda r: r["seconds"])
    assert {r["outcome"] for r in results} <= {"ok", "INVALID_KEY"}
    for r in results:  # values over MLflow's limits are truncated, as MLflow does; bad keys raise
        bad_key = r["key"] == "" or len(r["key"]) > 250 or r["key"].startswith(("bad key!", "/")) or "//" in r["key"] or r["key"].endswith("/")
        assert (r["outcome"] == "ok") == (not bad_key), r
    assert sum(r["outcome"] == "ok" for r in results) > 200 and sum(r["outcome"] != "ok" for r in results) > 200
    assert sum(r["outcome"] == "ok" and r["op"] != "metric" and r["value"] > 8000 for r in results) > 20  # truncated
    # Only the calls after the chains' end were refused at the sync point, each naming its key.
    assert report["deferred"] and {(e["code"], e["failed_op"]) for e in report["deferred"]} == {("INVALID_STATE", "log")}
    assert {e["key"] for e in report["deferred"]} <= {f"late{t}" for t in range(4)}
    assert report["sync_seconds"] < 60
    # Every valid record landed, exactly as sent; nothing after the end did.
    client = MlflowClient(tracking_uri=daemon.store_uri)
    parent = client.get_run(report["parent"]).data
    chains = {name: client.get_run(run_id).data for name, run_id in report["runs"].items()}
    for r in results:
        if r["outcome"] != "ok":
            continue
        data = parent if r["op"] == "global" else chains[f"t{r['thread']}"]
        if r["op"] == "metric":
            landed = data.metrics[r["key"]]
            assert repr(landed) == r["value"] or (landed != landed and r["value"] == "nan"), r
        elif r["op"] == "tag":
            assert data.tags[r["key"]] == "t" * min(r["value"], 8000), r["key"]
        else:
            assert data.params[r["key"]] == ("p" if r["op"] == "param" else "g") * min(r["value"], 6000), r["key"]
    assert not any(k.startswith("late") for data in chains.values() for k in data.metrics)
    assert daemon.status()["state"] == "running"
