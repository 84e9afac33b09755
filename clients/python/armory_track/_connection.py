"""One connection per process to armoryd: length-prefixed JSON frames over a Unix socket.

Fire-and-forget frames are appended to a buffer and sent by a flusher thread (a call never waits
for the daemon); single metrics are only queued, and the flusher writes a run's queued metrics as
one `log` frame. Requests wait for their reply; a reader thread takes acks, replies and the
errors of fire-and-forget frames, which are raised at the next sync point.
"""
from __future__ import annotations

import atexit
import collections
import itertools
import json
import operator
import os
import socket
import struct
import sys
import threading
from typing import Any, Dict, List, Optional

PROTOCOL = 1
CLIENT_VERSION = "0.1.0"
SYSTEM_SOCKET = "/run/armory/armoryd.sock"
_MAX_BUFFER = 8 << 20
_MAX_QUEUED_METRICS = 50_000  # then the caller formats and waits like any frame
_METRICS_PER_FRAME = 1000


class ArmoryError(RuntimeError):
    """armoryd refused operations; `errors` holds each refusal (code, op, message)."""

    def __init__(self, errors: List[Dict[str, Any]]):
        self.errors = errors
        lines = [f"  - {e.get('code')} (op '{e.get('failed_op', '?')}', seq {e.get('seq')}): {e.get('message')}" for e in errors[:10]]
        more = f"\n  … and {len(errors) - 10} more" if len(errors) > 10 else ""
        super().__init__(f"armoryd refused {len(errors)} operation(s):\n" + "\n".join(lines) + more)


def socket_candidates(environ=os.environ) -> List[str]:
    """DESIGN.md's order: $ARMORY_SOCKET alone when set; else the user socket if it exists; else the system one."""
    explicit = environ.get("ARMORY_SOCKET")
    if explicit:
        return [explicit]
    out = []
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.exists(os.path.join(runtime, "armory", "armoryd.sock")):
        out.append(os.path.join(runtime, "armory", "armoryd.sock"))
    out.append(SYSTEM_SOCKET)
    return out


def _described_candidates(environ=os.environ) -> List[str]:
    explicit = environ.get("ARMORY_SOCKET")
    if explicit:
        return [explicit]
    runtime = environ.get("XDG_RUNTIME_DIR")
    return ([os.path.join(runtime, "armory", "armoryd.sock")] if runtime else []) + [SYSTEM_SOCKET]


def _mlflow_credentials(environ=os.environ) -> Dict[str, str]:
    """MLflow's own rules: env variables, else the [mlflow] section of ~/.mlflow/credentials."""
    from_file: Dict[str, str] = {}
    path = os.path.join(environ.get("HOME", os.path.expanduser("~")), ".mlflow", "credentials")
    try:
        import configparser

        parser = configparser.ConfigParser()
        parser.read(path)
        if parser.has_section("mlflow"):
            from_file = dict(parser.items("mlflow"))
    except Exception:
        pass
    out = {}
    for key, env_name in (("username", "MLFLOW_TRACKING_USERNAME"), ("password", "MLFLOW_TRACKING_PASSWORD"), ("token", "MLFLOW_TRACKING_TOKEN")):
        value = environ.get(env_name) or from_file.get(f"mlflow_tracking_{key}")
        if value:
            out[key] = value
    return out


class Connection:
    """A thread-safe connection to armoryd. Use `connection()` for the per-process one."""

    def __init__(self, path: Optional[str] = None, timeout: float = 10.0):
        candidates = [path] if path else socket_candidates()
        last = "no candidate path"
        self.sock = None
        for candidate in candidates:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(candidate)
            except OSError as e:
                s.close()
                last = f"{candidate}: {e.strerror or e}"
                continue
            self.sock, self.path = s, candidate
            break
        if self.sock is None:
            tried = ", ".join([path] if path else _described_candidates())
            raise ConnectionError(
                f"No armoryd is listening (tried {tried}: {last}). Start one with "
                "`systemctl --user start armoryd.socket` (or the system unit), or run `armoryd &`; "
                "set ARMORY_SOCKET if it listens elsewhere.")
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # Held while a taken buffer is written: sends leave in the order their buffers were taken,
        # and callers appending frames never wait for the socket.
        self._send_lock = threading.Lock()
        self._buffer = bytearray()
        # Metrics queued by `send_metric` (deque appends are atomic: no lock on the hot path); every
        # other frame, and the flusher, first moves them into the buffer, so that order is kept.
        self._metrics: collections.deque = collections.deque()
        self._flusher_idle = False
        self._wake = threading.Event()
        self._seq = 0
        self._replies: Dict[int, Dict[str, Any]] = {}
        self._awaited = set()
        self._errors: List[Dict[str, Any]] = []
        self._closed: Optional[str] = None
        self.acked = 0
        threading.Thread(target=self._flush_loop, name="armory-flusher", daemon=True).start()
        threading.Thread(target=self._read_loop, name="armory-reader", daemon=True).start()
        environ = os.environ
        hello = {"protocol": PROTOCOL, "client": "armory_track", "client_version": CLIENT_VERSION,
                 "program": os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""}
        # Where this process's runs go: ARMORY_TRACKING_URI (for processes whose MLFLOW_TRACKING_URI
        # is armoryd://), else MLFLOW_TRACKING_URI; none, or armoryd:, is the daemon's own.
        uri = environ.get("ARMORY_TRACKING_URI") or environ.get("MLFLOW_TRACKING_URI")
        if environ.get("ARMORY_SYSTEM_METRICS", "").lower() in ("off", "false", "0", "no"):
            hello["system_metrics"] = False
        if uri:
            hello["tracking_uri"] = uri
            credentials = _mlflow_credentials(environ)
            if credentials:
                hello["credentials"] = credentials
        self.hello = self.request("hello", timeout=timeout, **hello)

    # -- sending ---------------------------------------------------------------

    def _frame(self, payload: bytes) -> None:
        """Appends one frame (caller holds the lock)."""
        while len(self._buffer) > _MAX_BUFFER and self._closed is None:
            self._cond.wait()
        if self._flusher_idle:
            self._wake.set()
        self._buffer += struct.pack(">I", len(payload))
        self._buffer += payload

    def _move_metrics(self) -> None:
        """Writes the queued metrics into the buffer, a run's consecutive ones as one `log` frame
        (caller holds the lock)."""
        queued, metrics = [], self._metrics
        while True:
            try:
                queued.append(metrics.popleft())
            except IndexError:
                break
        for run_head, group in itertools.groupby(queued, key=operator.itemgetter(0)):
            rows = [b"[%s%r,%d,%d]" % (key, value, step, timestamp) if value - value == 0.0
                    else b"[%s%s,%d,%d]" % (key, _non_finite(value), step, timestamp)
                    for _, key, value, step, timestamp in group]
            for start in range(0, len(rows), _METRICS_PER_FRAME):
                self._seq += 1
                self._frame(b'%s%s],"seq":%d}' % (run_head, b",".join(rows[start:start + _METRICS_PER_FRAME]), self._seq))

    def send(self, op: str, **fields: Any) -> int:
        """A fire-and-forget frame: returns its seq at once."""
        with self._lock:
            self._move_metrics()
            self._seq += 1
            seq = self._seq
            fields["op"] = op
            fields["seq"] = seq
            self._frame(json.dumps(fields, separators=(",", ":"), allow_nan=False, default=str).encode())
            return seq

    def send_metric(self, run_head: bytes, key: bytes, value: float, step: int, timestamp: int) -> None:
        """The hot path: queues one metric, without a lock or any formatting. `run_head` is
        `{"op":"log","run":<handle>,"metrics":[` and `key` the key as JSON and a comma, both bytes
        (the same `run_head` object for a run's metrics); `value` a float (NaN and ±Infinity become
        the protocol's strings)."""
        metrics = self._metrics
        metrics.append((run_head, key, value, step, timestamp))
        if self._flusher_idle:
            self._wake.set()
        if len(metrics) > _MAX_QUEUED_METRICS:
            with self._lock:
                self._move_metrics()  # waits there while the daemon is behind

    def request(self, op: str, timeout: float = 30.0, **fields: Any) -> Dict[str, Any]:
        """Sends a request and waits for its reply; a refusal raises ArmoryError."""
        with self._lock:
            self._move_metrics()
            self._seq += 1
            seq = self._seq
            fields["op"] = op
            fields["seq"] = seq
            self._awaited.add(seq)
            self._frame(json.dumps(fields, separators=(",", ":"), allow_nan=False, default=str).encode())
        self._send_pending()
        with self._lock:
            deadline = None if timeout is None else (_monotonic() + timeout)
            while seq not in self._replies:
                if self._closed is not None:
                    self._awaited.discard(seq)
                    raise ConnectionError(self._closed)
                remaining = None if deadline is None else deadline - _monotonic()
                if remaining is not None and remaining <= 0:
                    self._awaited.discard(seq)
                    raise TimeoutError(f"armoryd did not answer '{op}' within {timeout} s (socket {self.path}).")
                self._cond.wait(remaining)
            self._awaited.discard(seq)
            reply = self._replies.pop(seq)
        if reply.get("op") == "error":
            raise ArmoryError([reply])
        return reply

    def take_errors(self) -> List[Dict[str, Any]]:
        with self._lock:
            errors, self._errors = self._errors, []
            return errors

    def raise_errors(self) -> None:
        errors = self.take_errors()
        if errors:
            raise ArmoryError(errors)

    def _send_pending(self) -> None:
        """Sends what is buffered from the caller's thread, without holding the buffer's lock."""
        with self._send_lock:
            with self._lock:
                self._move_metrics()
                if not self._buffer or self._closed is not None:
                    return
                data, self._buffer = self._buffer, bytearray()
                self._cond.notify_all()  # writers held back by a full buffer
            try:
                self.sock.sendall(data)
            except OSError as e:
                with self._lock:
                    if self._closed is None:
                        self._closed = f"writing to armoryd failed: {e}"
                    self._cond.notify_all()
                    self._wake.set()  # the flusher ends

    def _flush_loop(self) -> None:
        while self._closed is None:
            if not self._buffer and not self._metrics:
                self._flusher_idle = True
                if not self._buffer and not self._metrics:  # a writer sees the flag, or this sees its data
                    self._wake.wait(1.0)
                self._wake.clear()
                self._flusher_idle = False
                continue
            # Let a burst of calls join the buffer, then send it with one syscall.
            _sleep(0.001)
            self._send_pending()

    def _read_loop(self) -> None:
        data = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError as e:
                chunk = b""
                reason = f"reading from armoryd failed: {e}"
            else:
                reason = f"armoryd closed the connection (socket {self.path})."
            if not chunk:
                with self._lock:
                    if self._closed is None:
                        self._closed = reason
                    self._cond.notify_all()
                    self._wake.set()  # the flusher ends
                return
            data += chunk
            messages = []
            while len(data) >= 4:
                (length,) = struct.unpack(">I", data[:4])
                if len(data) < 4 + length:
                    break
                messages.append(json.loads(data[4:4 + length]))
                data = data[4 + length:]
            if messages:
                with self._lock:
                    for m in messages:
                        op = m.get("op")
                        if op == "ack":
                            self.acked = max(self.acked, m["upto"])
                        elif op == "reply" or (op == "error" and m.get("seq") in self._awaited):
                            self._replies[m["seq"]] = m
                        elif op == "error":
                            self._errors.append(m)
                    self._cond.notify_all()

    def flush(self, wait: str = "durable", timeout: float = 10.0) -> Dict[str, Any]:
        """Waits until what was sent is durable (or uploaded); then raises earlier refusals."""
        reply = self.request("flush", timeout=timeout + 10, wait=wait, timeout_ms=int(timeout * 1000))
        self.raise_errors()
        return reply

    def close(self) -> None:
        self._send_pending()
        with self._lock:
            if self._closed is None:
                self._closed = "the connection was closed by the client."
            self._cond.notify_all()
            self._wake.set()  # the flusher ends
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def protocol_number(value: float):
    """A metric value as the protocol writes it: a float, or "NaN", "Infinity", "-Infinity"."""
    v = float(value)
    if v - v == 0.0:
        return v
    return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")


def _non_finite(value: float) -> bytes:
    return b'"NaN"' if value != value else (b'"Infinity"' if value > 0 else b'"-Infinity"')


def _monotonic() -> float:
    import time

    return time.monotonic()


def _sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)


_connection: Optional[Connection] = None
_connection_lock = threading.Lock()


def connection() -> Connection:
    """The per-process connection: created on first use, re-created after fork()."""
    global _connection
    c = _connection
    if c is not None and c.pid == os.getpid() and c._closed is None:
        return c
    with _connection_lock:
        if _connection is None or _connection.pid != os.getpid() or _connection._closed is not None:
            _connection = Connection()
        return _connection


def _after_fork_in_child() -> None:
    global _connection, _connection_lock
    if _connection is not None:  # the parent's: its threads did not survive the fork
        _connection._closed = "this connection belongs to the parent process (fork)."
    _connection = None  # the child opens its own connection (a fresh tracking session)
    _connection_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _exit_flush() -> None:
    c = _connection
    if c is None or c.pid != os.getpid() or c._closed is not None:
        return
    wait_upload = os.environ.get("ARMORY_WAIT_UPLOAD")
    try:
        if wait_upload:
            c.flush("uploaded", timeout=float(wait_upload))
        else:
            c.flush("durable", timeout=float(os.environ.get("ARMORY_EXIT_FLUSH_SECONDS", "10")))
    except ArmoryError as e:
        print(f"armory_track: {e}", file=sys.stderr)
    except Exception as e:  # exiting: report, never raise
        print(f"armory_track: flush at exit failed: {e}", file=sys.stderr)


atexit.register(_exit_flush)
