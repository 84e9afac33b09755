"""A real armoryd (the binary built by `swift build`) per test, on a private socket and store."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(os.environ.get("ARMORY_BIN", ROOT / ".build" / "debug"))
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    sock = str(home / "d.sock")
    log = open(home / "armoryd.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    proc = subprocess.Popen([str(BIN / "armoryd"), "--socket", sock, "--home", str(home), "--orphan-grace", "1"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    deadline = time.time() + 20
    while not os.path.exists(sock):
        assert proc.poll() is None and time.time() < deadline, (home / "armoryd.log").read_text()
        time.sleep(0.05)
    monkeypatch.setenv("ARMORY_SOCKET", sock)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import armory_track._connection as connection_module

    connection_module._connection = None  # each test opens its own connection
    yield type("Daemon", (), {"socket": sock, "store": home / "mlruns", "home": home, "proc": proc})
    if connection_module._connection is not None:
        connection_module._connection.close()
        connection_module._connection = None
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()
