"""Fair shares between users (issue 23): one uid cannot take the whole backlog, name destinations
without end, or read other users' runs. uid A (`nobody`) floods from 64 connections faster than
the server (SQLite behind a proxy) takes it while uid B streams: A is paused near its share of --max-backlog-bytes, B's acks keep
coming, and B's records reach the server while A's backlog still drains."""
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import Daemon, RawClient
from faultproxy import FaultProxy

BASE_TS = 1795700000000
MAX_BACKLOG = 16 << 20
SHARE = MAX_BACKLOG // 2

CLIENT_LIB = r'''
import json, socket, struct, sys, threading, time
def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s
def send(s, seq, **fields):
    payload = json.dumps(dict(seq=seq, **fields)).encode()
    s.sendall(struct.pack(">I", len(payload)) + payload)
def until(s, seq, buffer):
    while True:
        while len(buffer[0]) < 4 or len(buffer[0]) < 4 + struct.unpack(">I", buffer[0][:4])[0]:
            buffer[0] += s.recv(65536)
        n = struct.unpack(">I", buffer[0][:4])[0]
        frame, buffer[0] = buffer[0][4:4 + n], buffer[0][4 + n:]
        m = json.loads(frame)
        if m.get("seq") == seq and m["op"] in ("reply", "error"):
            return m
'''

# 64 connections of one user, each streaming 200-metric frames for a while (blocking when paused).
FLOOD = CLIENT_LIB + r'''
path, seconds, clients = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
sent = [0] * clients
def flood(i):
    s, buffer = connect(path), [b""]
    send(s, 1, op="hello", protocol=1, client="flood", program="flood")
    until(s, 1, buffer)
    send(s, 2, op="evaluation", id=1, name="flood")
    send(s, 3, op="chain", id=2, evaluation=1, name=f"c{i}")
    send(s, 4, op="start", chain=2)
    handle = until(s, 4, buffer)["handle"]
    deadline, seq, step = time.time() + seconds, 5, 0
    s.settimeout(0.5)  # a paused connection: keep trying until the deadline, then give up
    while time.time() < deadline:
        payload = json.dumps(dict(seq=seq, op="log", run=handle, metrics=[["m", 1.0, step + k, 1795700000000 + step + k] for k in range(200)])).encode()
        data = memoryview(struct.pack(">I", len(payload)) + payload)
        while data and time.time() < deadline:
            try:
                data = data[s.send(data):]
            except socket.timeout:
                pass
        if data:
            break
        seq, step, sent[i] = seq + 1, step + 200, sent[i] + 200
    s.close()
threads = [threading.Thread(target=flood, args=(i,)) for i in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"metrics": sum(sent)}))
'''

# The same user: a fifth destination of its own, and what status shows it.
OTHER_DESTINATIONS_AND_STATUS = CLIENT_LIB + r'''
path = sys.argv[1]
codes = []
for port in range(1, 6):
    s = connect(path)
    send(s, 1, op="hello", protocol=1, client="dest", program="dest", tracking_uri=f"http://127.0.0.1:{port}")
    m = until(s, 1, [b""])  # one frame: nothing else is buffered
    codes.append(m.get("code", "ok"))
    if m["op"] == "error": last = m["message"]
    s.close()
s = connect(path)
send(s, 1, op="hello", protocol=1, client="status", program="status")
until(s, 1, [b""])
send(s, 2, op="status")
print(json.dumps({"codes": codes, "message": last, "status": until(s, 2, [b""])}))
'''


def as_nobody(script, *args, **kwargs):
    return subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c", script, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to act as another uid")
def test_one_user_flooding_does_not_stall_another_and_stays_in_its_share(mlflow_server):
    nobody = pwd.getpwnam("nobody").pw_uid
    shared = tempfile.mkdtemp(prefix="armory-fair-")
    os.chmod(shared, 0o755)
    proxy = FaultProxy(mlflow_server.port)
    d = Daemon(Path(shared), env={"MLFLOW_TRACKING_URI": proxy.url},
               args=("--socket-mode", "666", "--max-backlog-bytes", str(MAX_BACKLOG), "--upload-concurrency", "2",
                     "--memory-backlog-bytes", "1M",  # A's backlog waits on disk: B's records must go around it
                     "--flush-interval", "0.05", "--shutdown-drain", "1"))
    try:
        flood = as_nobody(FLOOD, d.socket, "10", "64")
        b = RawClient(d.socket)
        b.hello()
        b.send("evaluation", id=1, name="fair-b")
        b.send("chain", id=2, evaluation=1, name="b")
        run = b.request("start", chain=2)
        ack_waits, peak_a, step = [], 0, 0
        deadline = time.time() + 8
        while time.time() < deadline:
            b.send("log", run=run["handle"], metrics=[["b", float(step), step, BASE_TS + step]])
            step += 1
            if step % 50 == 0:
                began = time.time()
                assert b.request("flush", wait="durable", timeout_ms=10000)["complete"]
                ack_waits.append(time.time() - began)
                peak_a = max(peak_a, d.status()["backlog_by_uid"].get(str(nobody), 0))
            time.sleep(0.005)
        out, err = flood.communicate(timeout=120)
        assert flood.returncode == 0, err
        print("peak backlog of A", peak_a, "of", MAX_BACKLOG, "; B waited for acks at most", max(ack_waits), "s; A sent", out)
        assert peak_a > SHARE * 3 // 4, peak_a                # A did fill its share ...
        assert peak_a < MAX_BACKLOG * 7 // 8, peak_a          # ... and was paused there, short of the whole bound
        assert max(ack_waits) < 3, ack_waits                  # B was never paused (a pause lasts until A drains): its acks kept coming

        # B's records reach the server while A's backlog still drains: a user with nothing in
        # the journal-only backlog goes around it. (B's points from now on are all behind A's in
        # the journal.) And B's `uploaded` flush waits for B's runs only, not for A's backlog.
        server = MlflowClient(tracking_uri=mlflow_server.url)
        backlog = d.status()["pending_records"]
        for extra in range(step, step + 100):
            b.send("log", run=run["handle"], metrics=[["b", float(extra), extra, BASE_TS + extra]])
        step += 100
        began = time.time()
        assert b.request("flush", wait="uploaded", timeout_ms=120000)["complete"]
        flushed_in, waiting = time.time() - began, d.status()["pending_records"]
        run_id = b.request("run_info", run=run["handle"])["run_id"]
        landed = sorted(m.step for m in server.get_metric_history(run_id, "b"))
        print("B's uploaded flush took", round(flushed_in, 2), "s and returned while", waiting, "of A's", backlog, "records waited")
        assert landed == list(range(step)), f"{len(landed)} of {step} points of B at the server after its uploaded flush"  # all, once
        assert waiting * 2 >= backlog, f"B's uploaded flush returned only after half of A's backlog of {backlog} records ({waiting} left)"

        # A's fifth destination of its own is refused; its status shows B's runs and B's own
        # destination (a server B names) only as counts.
        b_elsewhere = RawClient(d.socket)
        assert b_elsewhere.request("hello", protocol=1, client="pytest", program=__file__, tracking_uri="http://127.0.0.1:9")["destination"] == "http://127.0.0.1:9"
        other = as_nobody(OTHER_DESTINATIONS_AND_STATUS, d.socket)
        out, err = other.communicate(timeout=60)
        assert other.returncode == 0, err
        seen = json.loads(out)
        assert seen["codes"] == ["ok"] * 4 + ["TOO_MANY_DESTINATIONS"], seen
        assert "--max-destinations-per-user" in seen["message"]
        status = seen["status"]
        assert all(r["owner_uid"] == nobody for r in status["active_runs"])  # (A's flood runs may have ended FAILED by now)
        assert status["other_users"]["active_runs"] == 2  # B's evaluation and chain
        assert set(status["backlog_by_uid"]) <= {str(nobody)}
        shown = {x["destination"].split(" ")[0] for x in status["destinations"]}
        assert "http://127.0.0.1:9" not in shown and {f"http://127.0.0.1:{port}" for port in range(1, 5)} <= shown, shown
        assert status["other_users"]["destinations"] == 1
        b_elsewhere.close()
        b.close()
    finally:
        d.stop()
        proxy.close()
        shutil.rmtree(shared, ignore_errors=True)
