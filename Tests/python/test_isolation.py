"""Isolation and hostile input: another uid cannot touch a run; garbage from many connections at
once gets errors or closed connections while a well-behaved client is served throughout; the
connection limit is stated, not silent."""
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import Daemon, RawClient

NOBODY_CLIENT = r'''
import json, socket, struct, sys
path, handle, run_id = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
buffer = b""
def send(seq, **fields):
    payload = json.dumps(dict(seq=seq, **fields)).encode()
    s.sendall(struct.pack(">I", len(payload)) + payload)
def recv():
    global buffer
    while len(buffer) < 4 or len(buffer) < 4 + struct.unpack(">I", buffer[:4])[0]:
        buffer += s.recv(65536)
    n = struct.unpack(">I", buffer[:4])[0]
    frame, buffer = buffer[4:4 + n], buffer[4 + n:]
    return json.loads(frame)
def until(seq):
    seen = []
    while True:
        m = recv()
        if m["op"] == "error":
            seen.append(m["code"])
        if m.get("seq") == seq and m["op"] in ("reply", "error"):
            return seen
send(1, op="hello", protocol=1, client="nobody", program="x")
until(1)
send(2, op="log", run=handle, metrics=[["m", 1.0, 0, 1]])
send(3, op="end", run=handle, status="FAILED")
send(4, op="attach", run_id=run_id)
print(json.dumps({"codes": until(4)}))
'''


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to act as another uid")
def test_another_uid_cannot_write_end_or_attach_a_run():
    shared = tempfile.mkdtemp(prefix="armory-iso-")
    os.chmod(shared, 0o755)
    d = Daemon(__import__("pathlib").Path(shared), args=("--socket-mode", "666"))
    try:
        c = RawClient(d.socket)
        c.hello()
        c.send("evaluation", id=1, name="isolation")
        c.send("chain", id=2, evaluation=1, name="mine")
        run = c.request("start", chain=2)
        out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c", NOBODY_CLIENT,
                              d.socket, run["handle"], run["run_id"]], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        codes = json.loads(out.stdout)["codes"]
        assert codes == ["PERMISSION_DENIED"] * 3, codes  # log, end, attach
        # The owner goes on undisturbed.
        c.send("log", run=run["handle"], metrics=[["m", 2.0, 0, 1795400000000]])
        c.request("end", chain=2, status="FINISHED")
        assert c.request("flush", wait="uploaded", timeout_ms=10000)["complete"]
        assert not c.errors
    finally:
        d.stop()
        shutil.rmtree(shared, ignore_errors=True)


def garbage_frames(rng):
    yield rng.randbytes(rng.randint(1, 4096))                        # random bytes
    yield struct.pack(">I", 0xFFFFFFF0) + b"{}"                      # a huge length prefix
    yield struct.pack(">I", 100) + b'{"op":"log"'                    # truncated, then hang up
    deep = b"[" * 100_000 + b"]" * 100_000
    yield struct.pack(">I", len(deep)) + deep                        # deep nesting
    bad = b'{"op":"hello","seq":1,"client":"\xff\xfe"}'
    yield struct.pack(">I", len(bad)) + bad                          # invalid UTF-8
    ok_then_bad = json.dumps({"op": "hello", "seq": 1, "protocol": 1, "client": "g", "program": "g"}).encode()
    yield struct.pack(">I", len(ok_then_bad)) + ok_then_bad + struct.pack(">I", 5) + b"nope!"
    yield struct.pack(">I", 0)                                       # an empty frame


def test_garbage_from_many_connections_while_a_good_client_is_served(daemon):
    good = RawClient(daemon.socket)
    good.hello()
    good.send("evaluation", id=1, name="garbage")
    good.send("chain", id=2, evaluation=1, name="good")
    run = good.request("start", chain=2)
    stop = threading.Event()
    outcomes = []

    def attacker(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            for frame in garbage_frames(rng):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(10)
                    s.connect(daemon.socket)
                    try:
                        s.sendall(frame)
                        s.shutdown(socket.SHUT_WR)
                        data = b""
                        while chunk := s.recv(65536):
                            data += chunk
                        outcomes.append("error" if b'"op":"error"' in data else "closed")
                    except OSError:
                        outcomes.append("closed")

    threads = [threading.Thread(target=attacker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        for step in range(200):
            good.send("log", run=run["handle"], metrics=[["m", float(step), step, 1795400000000 + step]])
            if step % 20 == 0:
                assert good.request("flush", wait="durable", timeout_ms=10000)["complete"]
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    good.request("end", chain=2, status="FINISHED")
    assert good.request("flush", wait="uploaded", timeout_ms=10000)["complete"]
    assert not good.errors
    assert len(outcomes) > 50 and "error" in outcomes
    assert daemon.proc.poll() is None
    from mlflow.tracking import MlflowClient
    history = MlflowClient(tracking_uri=daemon.store_uri).get_metric_history(run["run_id"], "m")
    assert sorted(m.step for m in history) == list(range(200))


def test_one_connection_over_the_limit_is_told_why(tmp_path):
    d = Daemon(tmp_path, args=("--max-connections", "2"))
    try:
        time.sleep(0.5)  # the start-up probe's connection is counted until its close is processed
        a, b = RawClient(d.socket), RawClient(d.socket)
        a.hello()
        b.hello()
        c = RawClient(d.socket)
        message = c.recv()
        assert message["op"] == "error" and message["code"] == "TOO_MANY_CONNECTIONS"
        a.close()
        time.sleep(0.2)
        again = RawClient(d.socket)
        assert again.hello()["op"] == "reply"
    finally:
        d.stop()
