"""A real systemd for the units: booted as PID 1 of a private PID and mount namespace
(boot.sh), with the project installed inside as a lab host installs it (`make install`,
`systemd-sysusers`, `systemctl enable --now armoryd.socket`), users `alice` and `bob` in group
`armory` and `mallory` outside it. Nothing reaches the host: the session checks that a file it
put in the host's /tmp is still there afterwards."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy"))
BIN = Path(os.environ.get("ARMORY_BIN", ROOT / ".build" / "debug"))
# What users other than root may run inside: the example binary and the Python client (stdlib
# only), copied where everyone can read them; Debian's own interpreter (root's may live where
# others cannot read).
SHARED = "/usr/local/lib/armory-test"
PYTHON = "/usr/bin/python3"


class Manager:
    """systemd 252 as PID 1 of its own namespaces; `run` executes a command inside."""

    def __init__(self):
        self.proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--propagation", "private",
                                      str(ROOT / "Tests" / "systemd" / "boot.sh"), str(ROOT)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self._systemd_pid()
        deadline = time.time() + 60
        while True:
            state = self.run("systemctl is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"systemd did not boot ({state}): {self.proc.stdout.read().decode() if self.proc.poll() is not None else ''}")
            time.sleep(0.2)

    def _systemd_pid(self) -> int:
        """unshare's child: systemd, PID 1 inside."""
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the namespace did not start: {self.proc.stdout.read().decode()}")
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            for child in children:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
            time.sleep(0.05)
        raise RuntimeError("systemd did not start in the namespace")

    def run(self, command: str, user: str | None = None, check: bool = True, timeout: float = 120, env: dict | None = None):
        """`command` (a shell line) inside the namespace, as root or as `user` (a login-like
        environment: HOME, USER, PATH)."""
        prefix = ["nsenter", "-t", str(self.pid), "-m", "-p"]
        if user:
            variables = {"HOME": f"/home/{user}", "USER": user, "LOGNAME": user, "PATH": "/usr/local/bin:/usr/bin:/bin", **(env or {})}
            argv = prefix + ["runuser", "-u", user, "--", "env", "-i", *[f"{k}={v}" for k, v in variables.items()], "bash", "-c", command]
        else:
            argv = prefix + ["env", *[f"{k}={v}" for k, v in (env or {}).items()], "bash", "-c", command]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and out.returncode != 0:
            raise AssertionError(f"`{command}` as {user or 'root'} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    def show(self, unit: str, *properties: str) -> dict:
        out = self.run(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str = "armoryd.service", since: str | None = None) -> list:
        """The unit's journal entries, as journalctl's JSON."""
        out = self.run(f"journalctl -u {unit} -o json --no-pager" + (f" --since {shlex.quote(since)}" if since else "")).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_until(self, predicate, timeout: float = 30, what: str = "condition"):
        deadline = time.time() + timeout
        while not predicate():
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def stop(self):
        self.run("systemctl exit", check=False, timeout=30)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


def refused_reason() -> str | None:
    """Why a private systemd cannot boot here, or None."""
    if os.geteuid() != 0:
        return "needs root (unshare --pid --mount, overlayfs, nsenter)"
    for tool in ("unshare", "nsenter", "runuser"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    if not Path("/lib/systemd/systemd").exists():
        return "systemd is not installed (/lib/systemd/systemd)"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /mnt && mkdir /mnt/l /mnt/u /mnt/w /mnt/o && "
                            "mount -t overlay overlay -o lowerdir=/mnt/l,upperdir=/mnt/u,workdir=/mnt/w /mnt/o"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare or overlayfs is refused here: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="session")
def manager():
    reason = refused_reason()
    if reason:
        pytest.skip(f"no private systemd: {reason}")
    marker = Path("/tmp") / f"armory-systemd-test-{uuid.uuid4().hex}"
    marker.write_text("the host's /tmp must survive the test bed")
    m = Manager()
    try:
        m.run(f"make -s -C {shlex.quote(str(ROOT))} install PREFIX=/usr/local CONFIGURATION=debug", timeout=900)
        m.run(f"install -d -m 0755 {SHARED}/bin && install -m 0755 {BIN}/armory-example {SHARED}/bin/ && "
              f"cp -r {ROOT}/clients/python {SHARED}/python && chmod -R a+rX {SHARED}")
        # Samples every second, so that a short evaluation gets system metrics.
        m.run("echo 'system-metrics-interval: 1' >> /etc/armory/armoryd.conf")
        m.run("systemd-sysusers && useradd -m -G armory alice && useradd -m -G armory bob && useradd -m mallory")
        m.run("systemctl daemon-reload && systemctl enable --now armoryd.socket")
        yield m
    finally:
        m.stop()
        assert marker.exists(), "the test bed emptied the host's /tmp"
        marker.unlink()


@pytest.fixture
def alice_env():
    """What an evaluation of alice's runs with: the Python client on its path."""
    return {"PYTHONPATH": f"{SHARED}/python"}
