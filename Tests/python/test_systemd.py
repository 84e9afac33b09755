"""systemd integration, checked with systemd's own tools and a notify socket the test binds:
socket activation, READY/STATUS/WATCHDOG/STOPPING, and a wedged uploader stopping the watchdog."""
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import BIN, RawClient
from testbed import socket_answers as answers


class NotifySocket:
    """A datagram socket standing in for systemd's `$NOTIFY_SOCKET`; records each message with its time."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages = []  # (monotonic time, {field: value})
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key, value=None, timeout=20.0, after=0.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, fields in list(self.messages):
                if t >= after and key in fields and (value is None or fields[key] == value):
                    return t, fields
            time.sleep(0.02)
        raise AssertionError(f"no {key}={value or '*'} within {timeout} s; got {self.messages}")

    def times(self, key, since=0.0):
        return [t for t, fields in list(self.messages) if key in fields and t >= since]

    def close(self):
        self._stop = True
        self._thread.join()
        self.sock.close()


def start_notified_daemon(tmp_path, watchdog_usec=None, args=()):
    home = tmp_path / "home"
    home.mkdir()
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "LISTEN_", "WATCHDOG_", "NOTIFY_"))}
    env["NOTIFY_SOCKET"] = notify.path
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    log = open(home / "armoryd.log", "wb")
    proc = subprocess.Popen([str(BIN / "armoryd"), "--socket", str(home / "d.sock"), "--home", str(home), *args],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return proc, notify, home


def test_ready_only_once_the_socket_accepts_then_status_watchdog_and_stopping(tmp_path):
    proc, notify, home = start_notified_daemon(tmp_path, watchdog_usec=2_000_000)
    try:
        _, ready = notify.wait_for("READY", "1")
        assert answers(str(home / "d.sock"))  # READY=1 came after the socket accepts
        assert ready["STATUS"].startswith("running: 0 clients, 0 active runs")
        # A client shows up in the next status line.
        c = RawClient(str(home / "d.sock"))
        c.hello()
        deadline = time.monotonic() + 10  # the status line is refreshed at every watchdog period
        while not any(f.get("STATUS", "").startswith("running: 1 clients") for _, f in notify.messages):
            assert time.monotonic() < deadline, notify.messages
            time.sleep(0.1)
        # Watchdog pings at half of WATCHDOG_USEC (2 s): about one per second.
        start = time.monotonic()
        time.sleep(4.5)
        pings = notify.times("WATCHDOG", since=start)
        assert 3 <= len(pings) <= 7, pings
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert max(gaps) < 2.0, gaps  # never late enough for systemd to kill it
        c.close()
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING", "1", timeout=10)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()


def test_a_wedged_uploader_stops_the_watchdog_pings(tmp_path):
    """A store write that never returns (here: a metric file that is a FIFO nobody reads, as a hung
    file system would) wedges the uploader; the health check sees it and the pings stop."""
    proc, notify, home = start_notified_daemon(tmp_path, watchdog_usec=2_000_000)
    reader = None
    try:
        notify.wait_for("READY", "1")
        c = RawClient(str(home / "d.sock"))
        c.hello()
        run = c.request("create_run", experiment_id="0", run_name="wedge")
        metrics_dir = home / "mlruns" / "0" / run["run_id"] / "metrics"
        deadline = time.time() + 10
        while not metrics_dir.is_dir():
            assert time.time() < deadline
            time.sleep(0.05)
        fifo = metrics_dir / "stuck"
        os.mkfifo(fifo)
        c.send("log", run=run["handle"], metrics=[["stuck", 1.0, 0, 1795400000000]])
        deadline = time.monotonic() + 10
        while not any(f.get("STATUS", "").startswith("unhealthy") for _, f in notify.messages):
            assert time.monotonic() < deadline, notify.messages
            time.sleep(0.1)
        since = time.monotonic()
        time.sleep(3)
        assert notify.times("WATCHDOG", since=since) == []  # systemd would now restart it
        # The file system comes back: the write completes and the pings resume.
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        notify.wait_for("WATCHDOG", "1", timeout=10, after=time.monotonic())
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if reader is not None:
            os.close(reader)
        notify.close()


@pytest.mark.skipif(not Path("/usr/bin/systemd-socket-activate").exists(), reason="systemd-socket-activate is not installed")
def test_socket_activation_with_systemd_socket_activate(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    path = str(tmp_path / "activated.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "LISTEN_", "NOTIFY_", "ARMORY_SOCKET"))}
    log = open(home / "armoryd.log", "wb")
    # systemd-socket-activate binds the socket, then starts armoryd on the first connection.
    proc = subprocess.Popen(["systemd-socket-activate", "-l", path, "--fdname=armoryd", str(BIN / "armoryd"), "--home", str(home)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 10
        while not os.path.exists(path):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        c = RawClient(path)
        reply = c.hello()
        assert reply["op"] == "reply"
        status = c.request("status")
        assert status["socket"] == path and status["pid"] == proc.pid
        run = c.request("create_run", experiment_id="0", run_name="activated")
        c.request("flush", wait="uploaded", timeout_ms=10000)
        assert (home / "mlruns" / "0" / run["run_id"]).is_dir()
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert os.path.exists(path)  # systemd's socket: never unlinked by armoryd
        assert b"socket_activated=true" in (home / "armoryd.log").read_bytes()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_socket_outlives_a_daemon_restart_and_queued_clients_are_served(tmp_path):
    """What systemd does across `systemctl restart armoryd.service`: it keeps the listening socket
    and passes it to each new daemon (LISTEN_FDS); a client connecting in between waits, never refused."""
    home = tmp_path / "home"
    home.mkdir()
    path = str(tmp_path / "kept.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)

    def start():
        fd = listener.fileno()

        def hand_over():  # in the child: the socket as fd 3, LISTEN_PID naming the child
            os.dup2(fd, 3)
            os.set_inheritable(3, True)
            for key in [k for k in os.environ if k.startswith(("MLFLOW_TRACKING", "LISTEN_", "NOTIFY_", "ARMORY_SOCKET"))]:
                del os.environ[key]
            os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="armoryd")

        # env=None: the child execs with the environment hand_over() set up.
        return subprocess.Popen([str(BIN / "armoryd"), "--home", str(home)], close_fds=False, preexec_fn=hand_over,
                                stdout=open(home / "armoryd.log", "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    first = start()
    try:
        c = RawClient(path)
        c.hello()
        assert c.request("status")["pid"] == first.pid
        c.close()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
        assert os.path.exists(path)
        # Between the two daemons a client connects: the kernel queues it on the kept socket.
        waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        waiting.connect(path)
        second = start()
        try:
            queued = RawClient(connected=waiting)
            queued.hello()
            assert queued.request("status")["pid"] == second.pid
            queued.close()
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        listener.close()


def test_installed_units_verify_and_the_system_service_is_hardened(tmp_path):
    """`make install` into a private prefix; systemd's own analyzer checks the units as installed."""
    from conftest import ROOT

    prefix = tmp_path / "prefix"
    subprocess.run(["make", "-s", "install", f"PREFIX={prefix}", f"SYSCONFDIR={prefix}/etc", "CONFIGURATION=debug"], cwd=ROOT,
                   check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
    system, user = prefix / "lib/systemd/system", prefix / "lib/systemd/user"
    assert (prefix / "bin/armoryd").exists() and (prefix / "bin/armoryctl").exists()
    assert f"ExecStart={prefix}/bin/armoryd" in (system / "armoryd.service").read_text()
    assert (prefix / "lib/sysusers.d/armoryd.conf").read_text().count("armory") >= 2
    conf = prefix / "etc/armory/armoryd.conf"
    assert f"ExecStart={prefix}/bin/armoryd --config {conf}" in (system / "armoryd.service").read_text()
    checked = subprocess.run([str(prefix / "bin/armoryd"), "--config", str(conf), "--check-config", "--socket", str(tmp_path / "s.sock")],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert checked.returncode == 0 and re.search(r"^home +/var/lib/armory +\(file ", checked.stdout, re.M), checked.stdout + checked.stderr
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    for args in (["verify", str(system / "armoryd.service"), str(system / "armoryd.socket")],
                 ["verify", "--user", str(user / "armoryd.service"), str(user / "armoryd.socket")]):
        out = subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
        assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(ROOT / "systemd/armoryd.service")],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    exposure = float(out.stdout.strip().splitlines()[-1].split(":")[1].split()[0])
    assert exposure <= 1.5, out.stdout


def parse_journal_datagram(data: bytes) -> dict:
    """journald's native protocol: `KEY=value\\n`, or `KEY\\n<u64 length><value>\\n` for binary values."""
    fields, i = {}, 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = end + 1
        else:
            key, length = line, int.from_bytes(data[end + 1:end + 9], "little")
            value = data[end + 9:end + 9 + length]
            i = end + 9 + length + 1
        fields[key.decode()] = value.decode()
    return fields


def test_structured_entries_go_to_journald_when_stderr_is_the_journal(tmp_path):
    """With $JOURNAL_STREAM naming stderr (what systemd sets), entries go to journald with their
    fields (RUN_ID, EVALUATION, CLIENT_PID, PRIORITY); stderr stays empty."""
    journal_socket = "/run/systemd/journal/socket"
    if os.path.exists(journal_socket) or os.getuid() != 0:
        pytest.skip("a real journald runs here (or not root): this test stands in for journald by binding its socket")
    os.makedirs(os.path.dirname(journal_socket), exist_ok=True)
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(journal_socket)
    journal.settimeout(10)
    home = tmp_path / "home"
    home.mkdir()
    stderr = open(tmp_path / "stderr", "wb")
    info = os.fstat(stderr.fileno())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "NOTIFY_", "LISTEN_"))}
    env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
    proc = subprocess.Popen([str(BIN / "armoryd"), "--socket", str(home / "d.sock"), "--home", str(home)],
                            stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL, env=env)
    try:
        entries = []
        while not any(e.get("MESSAGE", "").startswith("armoryd") and "ready" in e["MESSAGE"] for e in entries):
            entries.append(parse_journal_datagram(journal.recv(65536)))
        c = RawClient(str(home / "d.sock"))
        c.hello()
        c.send("evaluation", id=1, name="journald-eval")
        run = c.request("start", evaluation=1)
        while not any(e.get("MESSAGE") == "run started" for e in entries):
            entries.append(parse_journal_datagram(journal.recv(65536)))
        started = next(e for e in entries if e.get("MESSAGE") == "run started")
        assert started["RUN_ID"] == run["run_id"] and started["EVALUATION"] == "journald-eval"
        assert started["CLIENT_PID"] == str(os.getpid()) and started["PRIORITY"] == "6" and started["SYSLOG_IDENTIFIER"] == "armoryd"
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert (tmp_path / "stderr").read_bytes() == b""  # nothing printed: it all went to the journal
    finally:
        if proc.poll() is None:
            proc.kill()
        journal.close()
        os.unlink(journal_socket)
