"""Fixtures for the Python suite: a real armoryd binary on a private socket, and a raw protocol client."""
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy"))
from testbed import ArmoryDaemon, MLflowServer, free_port, socket_answers  # noqa: E402,F401 (re-exported to the tests)
BIN = Path(os.environ.get("ARMORY_BIN", ROOT / ".build" / "debug"))
# Another build of the daemon (`make test` builds the release one), for restarts onto a new binary.
OTHER_BIN = Path(os.environ.get("ARMORY_OTHER_BIN", ROOT / ".build" / "release"))

os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"


class Daemon(ArmoryDaemon):
    """One armoryd process with its own socket and ARMORY_HOME (and, optionally, an MLflow server)."""

    def __init__(self, home: Path, env: dict | None = None, args: tuple = (), binary: Path = BIN):
        self.binary = binary
        super().__init__(home, binary / "armoryd", args=args, env=env)

    @property
    def store(self) -> Path:
        return self.home / "mlruns"

    @property
    def store_uri(self) -> str:
        return "file://" + str(self.store)

    def env(self) -> dict:
        """A client environment: this daemon's socket and no MLflow destination of its own."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
        return dict(env, ARMORY_SOCKET=self.socket)

    def status(self) -> dict:
        c = RawClient(self.socket)
        c.hello()
        status = c.request("status")
        c.send("bye")  # its session ends with the connection (not counted as waiting)
        c.close()
        return status


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    d.stop()


class RawClient:
    """The protocol by hand: length-prefixed JSON frames over the Unix socket."""

    def __init__(self, path: str | None = None, connected: socket.socket | None = None):
        if connected is None:
            connected = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connected.connect(path)
        self.sock = connected
        self.seq = 0
        self.buffer = b""
        self.errors = []  # errors of fire-and-forget frames, as the daemon reported them

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
            if message["op"] == "error":
                self.errors.append(message)

    def hello(self):
        return self.request("hello", protocol=1, client="pytest", program=__file__)

    def close(self):
        self.sock.close()


def start_chain(client, name, evaluation="rest-tests"):
    """Evaluation 1 with chain 2 called `name`, started; returns the chain's run reply."""
    client.send("evaluation", id=1, name=evaluation)
    client.send("chain", id=2, evaluation=1, name=name)
    return client.request("start", chain=2)


def wait_for(predicate, timeout=60):
    """Polls `predicate` every 0.2 s until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def log_steps(socket_path: str, evaluation: str, steps: int):
    """A raw client that started evaluation 1 and logged metric `m` at `steps` steps
    (fire-and-forget); returns it and the run's reply."""
    client = RawClient(socket_path)
    client.hello()
    client.send("evaluation", id=1, name=evaluation)
    run = client.request("start", evaluation=1)
    for step in range(steps):
        client.send("log", run=run["handle"], metrics=[["m", float(step), step, 1795400000000 + step]])
    return client, run


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MLflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


AUTH_PASSWORD = "armory-test-Pw1"


@pytest.fixture(scope="session")
def mlflow_auth_server(tmp_path_factory):
    """A real `mlflow server --app-name basic-auth`: user `admin`, password `AUTH_PASSWORD`."""
    server = MLflowServer(tmp_path_factory.mktemp("mlflow-auth-server"), extra_args=("--app-name", "basic-auth"),
                          env={"MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret", "MLFLOW_AUTH_ADMIN_PASSWORD": AUTH_PASSWORD})
    yield server
    server.stop()
