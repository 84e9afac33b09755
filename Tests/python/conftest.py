"""Fixtures for the Python suite: a real armoryd binary on a private socket, and a raw protocol client."""
import json
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("ARMORY_BIN", ROOT / ".build" / "debug"))

os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"


class Daemon:
    """One armoryd process with its own socket and ARMORY_HOME."""

    def __init__(self, home: Path):
        self.home = home
        self.socket = str(home / "d.sock")
        self.log = open(home / "armoryd.log", "wb")
        self.proc = subprocess.Popen(
            [str(BIN / "armoryd"), "--socket", self.socket, "--home", str(home), "--log-level", "info"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.time() + 20
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"armoryd did not start: {(home / 'armoryd.log').read_text()}")
            time.sleep(0.05)

    @property
    def store(self) -> Path:
        return self.home / "mlruns"

    @property
    def store_uri(self) -> str:
        return "file://" + str(self.store)

    def env(self) -> dict:
        return dict(os.environ, ARMORY_SOCKET=self.socket)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    d.stop()


class RawClient:
    """The protocol by hand: length-prefixed JSON frames over the Unix socket."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.seq = 0
        self.buffer = b""

    def send(self, op: str, **fields) -> int:
        self.seq += 1
        payload = json.dumps(dict(op=op, seq=self.seq, **fields)).encode()
        self.sock.sendall(struct.pack(">I", len(payload)) + payload)
        return self.seq

    def recv(self) -> dict:
        while len(self.buffer) < 4 or len(self.buffer) < 4 + struct.unpack(">I", self.buffer[:4])[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("armoryd closed the connection")
            self.buffer += chunk
        n = struct.unpack(">I", self.buffer[:4])[0]
        frame, self.buffer = self.buffer[4:4 + n], self.buffer[4 + n:]
        return json.loads(frame)

    def request(self, op: str, **fields) -> dict:
        seq = self.send(op, **fields)
        while True:
            message = self.recv()
            if message.get("seq") == seq and message["op"] in ("reply", "error"):
                if message["op"] == "error":
                    raise RuntimeError(f"{message['code']}: {message['message']}")
                return message

    def hello(self):
        return self.request("hello", protocol=1, client="pytest", program=__file__)

    def close(self):
        self.sock.close()
