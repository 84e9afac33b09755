"""A real armoryd (the binary built by `swift build`) per test, on a private socket and store:
the same `ArmoryDaemon` as the daemon's own suite and the lab testbed (`deploy/testbed.py`)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "deploy"))
from testbed import ArmoryDaemon  # noqa: E402

BIN = Path(os.environ.get("ARMORY_BIN", ROOT / ".build" / "debug"))
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    home = tmp_path / "home"
    # The daemon's defaults, but a short grace: a test's vanished clients end their runs at once.
    d = ArmoryDaemon(home, BIN / "armoryd", args=("--orphan-grace", "1", "--system-metrics-interval", "10"))
    monkeypatch.setenv("ARMORY_SOCKET", d.socket)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import armory_track._connection as connection_module

    connection_module._connection = None  # each test opens its own connection
    d.store = home / "mlruns"
    yield d
    if connection_module._connection is not None:
        connection_module._connection.close()
        connection_module._connection = None
    d.stop()
