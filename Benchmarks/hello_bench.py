"""What a client's `hello` costs now that it journals its session: client hellos alternating with
admin hellos (which journal nothing, the baseline in the same run), each on a fresh connection
ending with `bye`.

    .venv/bin/python Benchmarks/hello_bench.py .build/release/armoryd [STATE_PARENT] [COUNT]   # make bench runs it
"""
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def frame(message: dict) -> bytes:
    payload = json.dumps(message).encode()
    return struct.pack(">I", len(payload)) + payload


def hello_ms(path: str, admin: bool) -> float:
    """One connection: the time from sending `hello` to its whole reply, then `bye`."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        message = {"op": "hello", "seq": 1, "protocol": 1, "client": "hello-bench", "program": "hello-bench"}
        if admin:
            message["admin"] = True
        start = time.perf_counter()
        s.sendall(frame(message))
        buffer = b""
        while len(buffer) < 4 or len(buffer) < 4 + struct.unpack(">I", buffer[:4])[0]:
            buffer += s.recv(65536)
        elapsed = time.perf_counter() - start
        s.sendall(frame({"op": "bye", "seq": 2}))
    return elapsed * 1e3


def main():
    armoryd = Path(sys.argv[1])
    parent = sys.argv[2] if len(sys.argv) > 2 else None  # where the state lives: a real disk for fsync
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    home = Path(tempfile.mkdtemp(prefix="armory-hello-bench-", dir=parent))
    path = str(home / "d.sock")
    daemon = subprocess.Popen([str(armoryd), "--socket", path, "--home", str(home), "--system-metrics-interval", "0",
                               "--log-level", "warning"], stdin=subprocess.DEVNULL)
    try:
        while not os.path.exists(path):
            time.sleep(0.05)
        time.sleep(0.5)
        times = {False: [], True: []}
        for i in range(2 * count):
            admin = i % 2 == 1
            times[admin].append(hello_ms(path, admin))
    finally:
        daemon.terminate()
        daemon.wait()
    for admin, name in ((False, "client hello (journals its session)"), (True, "admin hello (baseline: not journaled)")):
        xs = sorted(times[admin])
        print(f"{name:40s} p50 {statistics.median(xs):.3f} ms  p99 {xs[int(len(xs) * 0.99)]:.3f} ms  n={len(xs)}")


if __name__ == "__main__":
    main()
