"""One connection per process to armoryd: length-prefixed JSON frames over a Unix socket.

Fire-and-forget frames are appended to a buffer and sent by a flusher thread (a call never waits
for the daemon); single metrics are only queued, and the flusher writes a run's queued metrics as
one `log` frame. Requests wait for their reply; a reader thread takes acks, replies and the
errors of fire-and-forget frames, which are raised at the next sync point.

The session outlives the socket: every frame sent is kept until the daemon acknowledges it. When
the connection breaks (a daemon restart, an upgrade, the watchdog), a reconnect thread connects
again for up to ARMORY_RECONNECT_SECONDS (default 300), resumes the session (`hello` with
`resume`) and resends what the daemon does not hold; calls meanwhile go on as usual (requests
wait). At most ARMORY_RETAIN_BYTES (default 64 MiB) are kept: past it, callers wait for acks.

No call waits without a bound: a full send buffer waits at most ARMORY_SEND_TIMEOUT (default 300 s)
for the daemon to read, a request its timeout, a flush its own; each then raises naming what was
not delivered. A call MLflow or the daemon would refuse (a bad key, a value over MLflow's limit, a
frame over the daemon's) raises at the call, before anything is sent.
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
import warnings
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from . import _rules

PROTOCOL = 1
CLIENT_VERSION = "0.1.0"
SYSTEM_SOCKET = "/run/armory/armoryd.sock"
_MAX_BUFFER = 8 << 20
_MAX_QUEUED_METRICS = 50_000  # then the caller formats and waits like any frame
_METRICS_PER_FRAME = 1000
_DEFAULT_RETAIN_BYTES = 64 << 20
_DEFAULT_RECONNECT_SECONDS = 300.0
_DEFAULT_SEND_TIMEOUT = 300.0
_DEFAULT_CONNECT_TIMEOUT = 30.0
# Ops the daemon answers with a reply (ClientOp.requestNames in ArmoryProtocol).
_REQUEST_OPS = frozenset(("hello", "get_params", "get_trackable", "start", "end", "attach", "run_info", "artifact_open",
                          "artifact_close", "flush", "status", "experiment", "create_run", "set_experiment_tag", "sync",
                          "sync_status", "dead_letters"))
# Errors after which the daemon closes the connection: resending would only repeat them.
_CLOSING_CODES = ("FRAME_TOO_LARGE", "UNSUPPORTED_PROTOCOL")


class ArmoryWarning(UserWarning):
    """Something armoryd wants the evaluation to know although its records are safe: a
    destination that refuses the daemon's credentials (the records wait in its journal)."""


class ArmoryError(RuntimeError):
    """armoryd refused operations; `errors` holds each refusal (code, failed_op, key, seq, message).
    Refused at the call (`seq` None): checked before sending, nothing of it was sent."""

    def __init__(self, errors: List[Dict[str, Any]]):
        self.errors = errors
        lines = [f"  - {e.get('code')} (op '{e.get('failed_op') or '?'}'"
                 f"{', seq ' + str(e['seq']) if e.get('seq') is not None else ''}): {e.get('message')}" for e in errors[:10]]
        more = f"\n  … and {len(errors) - 10} more" if len(errors) > 10 else ""
        who = "armoryd refused" if any(e.get("seq") is not None for e in errors) else "refused before sending"
        super().__init__(f"{who} {len(errors)} operation(s):\n" + "\n".join(lines) + more)


def socket_candidates(environ=os.environ) -> List[str]:
    """docs/architecture.md, "Finding the daemon": $ARMORY_SOCKET alone when set; else the user socket if it exists; else the system one."""
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


def _connect(path: Optional[str]):
    """The first socket that accepts, and its path; raises ConnectionError naming every path tried.
    A write that the daemon does not take within ARMORY_SEND_TIMEOUT fails (and the session is
    resumed on a new connection): no send blocks without a bound."""
    send_timeout = _env_float("ARMORY_SEND_TIMEOUT", _DEFAULT_SEND_TIMEOUT)
    candidates = [path] if path else socket_candidates()
    last = "no candidate path"
    for candidate in candidates:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(candidate)
        except PermissionError:
            s.close()
            raise PermissionError(_permission_message(candidate)) from None
        except OSError as e:
            s.close()
            last = f"{candidate}: {e.strerror or e}"
            continue
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(send_timeout), int(send_timeout % 1 * 1e6)))
        return s, candidate
    tried = ", ".join([path] if path else _described_candidates())
    raise ConnectionError(
        f"No armoryd is listening (tried {tried}: {last}). Start one with "
        "`systemctl --user start armoryd.socket` (or the system unit), or run `armoryd &`; "
        "set ARMORY_SOCKET if it listens elsewhere.")


def _permission_message(path: str) -> str:
    """Why this user may not connect to `path`, and what to do: the socket's group."""
    try:
        import grp

        group = grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError):
        group = "armory"
    return (f"Permission denied on {path}: armoryd's socket is for members of group '{group}'. Ask an admin to add you "
            f"(`sudo usermod -aG {group} $USER`), then log in again (or run `newgrp {group}`).")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class Connection:
    """A thread-safe connection to armoryd. Use `connection()` for the per-process one."""

    def __init__(self, path: Optional[str] = None, timeout: Optional[float] = None):
        self._explicit_path = path
        self.sock, self.path = _connect(path)
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
        self._warned: Set[str] = set()  # flush warnings already shown
        self._closed: Optional[str] = None
        self.acked = 0
        # Sent frames kept until acked, as (seq of the first and of the last frame in them, bytes),
        # in order; and the frames of requests still waiting for their reply (resent after a resume
        # when the daemon may have lost its reply: answered again, or as the first time).
        self._retained: collections.deque = collections.deque()
        self._retained_bytes = 0
        self._buffer_first = 0
        self._request_frames: Dict[int, bytes] = {}
        self._max_retained = int(_env_float("ARMORY_RETAIN_BYTES", _DEFAULT_RETAIN_BYTES))
        self._reconnect_seconds = _env_float("ARMORY_RECONNECT_SECONDS", _DEFAULT_RECONNECT_SECONDS)
        self._send_timeout = _env_float("ARMORY_SEND_TIMEOUT", _DEFAULT_SEND_TIMEOUT)
        # How long hello's answer may take: a daemon on a saturated host answers late, not never.
        self._connect_timeout = _env_float("ARMORY_CONNECT_TIMEOUT", _DEFAULT_CONNECT_TIMEOUT)
        self.limits = _rules.limits(None)
        self._reconnecting = False
        self._fatal: Optional[str] = None
        self.session: Optional[str] = None
        self.resumes = 0
        threading.Thread(target=self._flush_loop, name="armory-flusher", daemon=True).start()
        threading.Thread(target=self._read_loop, args=(self.sock,), name="armory-reader", daemon=True).start()
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
        self._hello_fields = hello
        self.hello = self.request("hello", timeout=timeout if timeout is not None else self._connect_timeout, **hello)
        self.limits = _rules.limits(self.hello)
        self.session = self.hello.get("session")
        if self.session is None:
            self._reconnect_seconds = 0  # a daemon without sessions: nothing could be resumed

    # -- sending ---------------------------------------------------------------

    def check(self, op: str, kind: str, entries: Iterable[Tuple[Any, Optional[str]]]) -> List[Tuple[Any, Optional[str]]]:
        """`entries` ((key, value or None) pairs of a metric, param or tag) as MLflow's client
        would log them: a value over MLflow's limit is truncated to it with a warning, as MLflow
        does (MLFLOW_TRUNCATE_LONG_VALUES=false: refused instead). Raises ArmoryError (nothing
        sent) for a key MLflow refuses."""
        limits = self.limits
        problems, checked = [], []
        for key, value in entries:
            why = _rules.key_problem(key, kind, limits["max_key_length"])
            code = "INVALID_KEY"
            if why is None and value is not None and kind != "metric":
                limit = limits[f"max_{kind}_value_length"]
                why = _rules.value_problem(key, value, kind, limit)
                code = "INVALID_VALUE"
                if why and _rules.truncates_long_values():
                    _rules.warn_truncated(key, value, kind, limit)
                    value, why = value[:limit], None
            if why:
                problems.append(_rules.refusal(code, op, why, key if isinstance(key, str) else None))
            checked.append((key, value))
        if problems:
            raise ArmoryError(problems)
        return checked

    def _wait_for_room(self) -> None:
        """Waits (caller holds the lock) while the buffer or what is kept for resending is full,
        at most ARMORY_SEND_TIMEOUT while the daemon is there and does not read (a daemon that is
        away is waited for within the reconnect budget). While the daemon is away the buffer may
        grow to the retention bound: calls keep their usual cost through an outage until then."""
        deadline = None
        extended = False
        while self._closed is None and self._buffer and (
                (len(self._buffer) > _MAX_BUFFER and not self._reconnecting)
                or self._retained_bytes + len(self._buffer) > self._max_retained):
            if deadline is None:
                deadline = _monotonic() + self._send_timeout
            if self._reconnecting and not extended:  # the daemon is away: its budget too
                deadline += self._reconnect_seconds
                extended = True
            if _monotonic() >= deadline:
                raise TimeoutError(f"armoryd has not read from this process for ARMORY_SEND_TIMEOUT={self._send_timeout:g} s "
                                   f"(socket {self.path}; `armoryctl status` shows why): {self._undelivered()} yet. "
                                   "They are still sent if it catches up.")
            self._cond.wait(1.0)
        if self._closed is not None:
            raise ConnectionError(self._closed)

    def _encode(self, op: str, fields: Dict[str, Any]) -> bytes:
        """The frame's JSON with the next seq (caller holds the lock); raises ArmoryError, nothing
        numbered or sent, when it is larger than the daemon accepts."""
        fields["op"] = op
        fields["seq"] = self._seq + 1
        try:
            payload = json.dumps(fields, separators=(",", ":"), allow_nan=False, default=str).encode()
        except ValueError as e:  # NaN or ±Infinity outside a metric value
            raise ArmoryError([_rules.refusal("INVALID_VALUE", op, f"'{op}' carries a value JSON cannot hold ({e}); "
                                              "only metric values may be NaN or ±Infinity.")]) from None
        limit = self.limits["max_frame_bytes"]
        if len(payload) > limit:
            raise ArmoryError([_rules.refusal(
                "FRAME_TOO_LARGE", op, f"'{op}' would be a frame of {len(payload)} bytes; armoryd accepts at most {limit} "
                "(max_frame_bytes). Log large values as artifacts (log_text, log_dict, log_artifact), which are sent in chunks.")])
        self._seq += 1
        return payload

    def _frame(self, payload: bytes) -> None:
        """Appends one frame (caller holds the lock); never waits (`_wait_for_room` does, first)."""
        if self._flusher_idle:
            self._wake.set()
        if not self._buffer:
            self._buffer_first = self._seq  # callers number the frame before appending it
        self._buffer += struct.pack(">I", len(payload))
        self._buffer += payload

    def _move_metrics(self) -> None:
        """Writes the queued metrics into the buffer, a run's consecutive ones as one `log` frame
        (caller holds the lock). Never waits: the flusher, which empties the buffer, calls it too."""
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
        """A fire-and-forget frame: returns its seq at once (unless the buffer is full)."""
        with self._lock:
            if self._closed is not None:
                raise ConnectionError(self._closed)
            self._wait_for_room()
            self._move_metrics()
            self._frame(self._encode(op, fields))
            return self._seq

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
                self._wait_for_room()  # while the daemon is behind
                self._move_metrics()

    def request(self, op: str, timeout: float = 30.0, outage: bool = True, urgent: bool = False, **fields: Any) -> Dict[str, Any]:
        """Sends a request and waits for its reply; a refusal raises ArmoryError. While the daemon
        is away the wait goes on within the reconnect budget, unless `outage` is False (then
        `timeout` bounds it all the same: the flush at exit). `urgent`: does not wait for room in
        the buffer (a run ended KILLED after Ctrl-C)."""
        with self._lock:
            if self._closed is not None:
                raise ConnectionError(self._closed)
            if not urgent:
                self._wait_for_room()
            self._move_metrics()
            payload = self._encode(op, fields)
            seq = self._seq
            self._awaited.add(seq)
            self._request_frames[seq] = struct.pack(">I", len(payload)) + payload
            self._frame(payload)
        self._send_pending()
        with self._lock:
            deadline = None if timeout is None else (_monotonic() + timeout)
            try:
                while seq not in self._replies:
                    if self._closed is not None:
                        raise ConnectionError(self._closed)
                    remaining = None if deadline is None else deadline - _monotonic()
                    # While the daemon is away, a request waits within the reconnect budget instead.
                    if remaining is not None and remaining <= 0 and not (self._reconnecting and outage):
                        if self._reconnecting:
                            raise TimeoutError(f"armoryd is away (its connection broke) and was not back within {timeout} s: "
                                               f"{self._undelivered()} yet.")
                        raise TimeoutError(f"armoryd did not answer '{op}' within {timeout} s (socket {self.path}).")
                    self._cond.wait(0.5 if remaining is None else max(0.0, min(remaining, 0.5)))
                reply = self._replies.pop(seq)
            finally:
                self._awaited.discard(seq)
                self._request_frames.pop(seq, None)
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

    def _send_pending(self, wait_for_sender: bool = True) -> None:
        """Sends what is buffered from the caller's thread, without holding the buffer's lock;
        keeps it until the daemon acknowledges it. `wait_for_sender` False (the flusher): while
        another send is under way (a slow daemon, a resume's resend), queued metrics only become
        frames, so that no caller has to format a backlog itself."""
        if not self._send_lock.acquire(blocking=wait_for_sender):
            with self._lock:
                self._move_metrics()
            return
        try:
            with self._lock:
                self._move_metrics()
                if not self._buffer or self._closed is not None or self._reconnecting:
                    return
                data, self._buffer = self._buffer, bytearray()
                self._retained.append((self._buffer_first, self._seq, data))
                self._retained_bytes += len(data)
                self._cond.notify_all()  # writers held back by a full buffer
                sock = self.sock
            try:
                sock.sendall(data)
            except OSError as e:
                self._lost(sock, f"writing to armoryd failed: {e}")
        finally:
            self._send_lock.release()

    # -- resuming --------------------------------------------------------------

    def _lost(self, sock, reason: str) -> None:
        """The socket broke: resume the session on a new one (or close, with no session yet)."""
        with self._lock:
            if sock is not self.sock or self._reconnecting or self._closed is not None:
                return
            if self._reconnect_seconds <= 0 or self._fatal:
                # A frame the daemon closed the connection for would be refused again on resume.
                self._closed = f"armoryd closed the connection: {self._fatal}" if self._fatal else reason
                self._cond.notify_all()
                self._wake.set()  # the flusher ends
                return
            self._reconnecting = True
            self._cond.notify_all()
        try:
            sock.close()
        except OSError:
            pass
        threading.Thread(target=self._reconnect, args=(reason,), name="armory-reconnect", daemon=True).start()

    def _undelivered(self) -> str:
        """What a give-up leaves undelivered, for the error (caller holds the lock)."""
        first = self.acked + 1
        frames = self._seq - self.acked
        held = self._retained_bytes + len(self._buffer)
        return (f"{frames} frame(s) after seq {self.acked} (seq {first}-{self._seq}, {held} bytes"
                f"{', and ' + str(len(self._metrics)) + ' queued metrics' if self._metrics else ''}) were not delivered")

    def _reconnect(self, reason: str) -> None:
        deadline = _monotonic() + self._reconnect_seconds
        delay = 0.02
        last = reason
        while True:
            with self._lock:
                if self._closed is not None:
                    return
            try:
                sock, path = _connect(self._explicit_path)
            except ConnectionError as e:
                last = str(e).split(" Start one")[0]
            else:
                try:
                    if self._resume(sock, path):
                        return
                except (OSError, ValueError) as e:
                    last = f"resuming on {path} failed: {e}"
                    try:
                        sock.close()
                    except OSError:
                        pass
                with self._lock:
                    if self._closed is not None:
                        return
            if _monotonic() >= deadline:
                with self._lock:
                    if self._closed is None:
                        self._closed = (
                            f"armoryd did not come back within ARMORY_RECONNECT_SECONDS={self._reconnect_seconds:g} s "
                            f"(the connection broke: {reason}; last try: {last}): {self._undelivered()}. "
                            "They are lost unless the daemon comes back; restart the evaluation once it runs.")
                    self._reconnecting = False
                    self._cond.notify_all()
                    self._wake.set()
                return
            _sleep(delay)
            delay = min(delay * 2, 0.1)

    def _resume(self, sock, path: str) -> bool:
        """Sends `hello` with `resume` on `sock`, then resends what the daemon does not hold.
        Returns False to try again later; a refused or lost session closes the connection.
        Without a session yet (the broken connection's `hello` was not answered), the kept frames,
        that `hello` first, simply go again on the new socket."""
        if self.session is None:
            self._continue_on(sock, path, held=0, leftover=b"")
            return True
        with self._lock:
            self._seq += 1
            hello_seq = self._seq
            acked = self.acked
        fields = dict(self._hello_fields, op="hello", seq=hello_seq, resume={"session": self.session, "acked": acked})
        payload = json.dumps(fields, separators=(",", ":"), default=str).encode()
        sock.settimeout(self._connect_timeout)
        sock.sendall(struct.pack(">I", len(payload)) + payload)
        data = b""
        reply = None
        while reply is None:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("the daemon closed the connection during the handshake")
            data += chunk
            while len(data) >= 4 and reply is None:
                (length,) = struct.unpack(">I", data[:4])
                if len(data) < 4 + length:
                    break
                message = json.loads(data[4:4 + length])
                data = data[4 + length:]
                if message.get("seq") == hello_seq:
                    reply = message
        sock.settimeout(None)
        if reply.get("op") == "error" or not reply.get("resumed"):
            why = reply.get("message") or reply.get("reason") or "unknown"
            with self._lock:
                if self._closed is None:
                    self._closed = (f"armoryd no longer holds this process's session {self.session} ({why}): "
                                    f"{self._undelivered()}. Its runs end FAILED after the daemon's grace period; "
                                    "run the evaluation again.")
                self._reconnecting = False
                self._cond.notify_all()
                self._wake.set()
            sock.close()
            return True
        self._continue_on(sock, path, held=int(reply.get("held", 0)), leftover=data)
        return True

    def _continue_on(self, sock, path: str, held: int, leftover: bytes) -> None:
        """Carries on over `sock`: resends what the daemon does not hold, in order, then the rest."""
        with self._send_lock:
            with self._lock:
                # Every kept frame after what the daemon holds goes again, in order, and before them
                # each request still waiting for its reply that they do not carry (its frame was
                # acked or is held: the daemon answers it again, or as the first time).
                chunks = [(first, data) for first, last, data in self._retained if last > held]
                # (Frames not sent yet are carried by the buffer, sent right after.)
                carried_from = chunks[0][0] if chunks else (self._buffer_first if self._buffer else self._seq + 1)
                resend = [frame for seq, frame in sorted(self._request_frames.items()) if seq < carried_from]
                resend += [data for _, data in chunks]
                self.sock, self.path = sock, path
                self._reconnecting = False
                self.resumes += 1
                self._cond.notify_all()
                self._wake.set()
            # Frames that came right behind the hello reply (acks) are the new reader's first input.
            threading.Thread(target=self._read_loop, args=(sock, leftover), name="armory-reader", daemon=True).start()
            try:
                sock.sendall(b"".join(resend))
            except OSError as e:
                self._lost(sock, f"writing to armoryd failed: {e}")
        self._send_pending()

    def _flush_loop(self) -> None:
        while self._closed is None:
            if self._reconnecting:
                # The resume sends what piled up; meanwhile queued metrics become frames here, so
                # that no caller formats a backlog itself.
                with self._lock:
                    self._move_metrics()
                self._wake.wait(0.01)
                self._wake.clear()
                continue
            if not self._buffer and not self._metrics:
                self._flusher_idle = True
                if not self._buffer and not self._metrics:  # a writer sees the flag, or this sees its data
                    self._wake.wait(1.0)
                self._wake.clear()
                self._flusher_idle = False
                continue
            # Let a burst of calls join the buffer, then send it with one syscall.
            _sleep(0.001)
            self._send_pending(wait_for_sender=False)

    def _read_loop(self, sock, data: bytes = b"") -> None:
        chunk = data
        data = b""
        while True:
            if not chunk:
                try:
                    chunk = sock.recv(65536)
                except OSError as e:
                    chunk = b""
                    reason = f"reading from armoryd failed: {e}"
                else:
                    reason = f"armoryd closed the connection (socket {self.path})."
                if not chunk:
                    self._lost(sock, reason)
                    return
            data += chunk
            chunk = b""
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
                            retained = self._retained
                            while retained and retained[0][1] <= self.acked:
                                self._retained_bytes -= len(retained.popleft()[2])
                        elif op == "reply" or (op == "error" and m.get("seq") in self._awaited):
                            if m.get("seq") in self._awaited:  # a re-sent request may be answered twice
                                self._replies[m["seq"]] = m
                        elif op == "error" and not (m.get("seq") is not None and m.get("failed_op") in _REQUEST_OPS):
                            # (an error for a request no longer awaited answers a re-sent request
                            # whose answer was already taken: not a new refusal)
                            self._errors.append(m)
                        if op == "error" and m.get("code") in _CLOSING_CODES:
                            self._fatal = f"{m.get('code')}: {m.get('message')}"
                    self._cond.notify_all()

    def flush(self, wait: str = "durable", timeout: float = 10.0, outage: bool = True, urgent: bool = False) -> Dict[str, Any]:
        """Waits until what was sent is durable (or uploaded); then raises earlier refusals.
        `outage` False: `timeout` bounds the wait even while the daemon is away."""
        reply = self.request("flush", timeout=timeout + (10 if outage else 0), outage=outage, urgent=urgent, wait=wait,
                             timeout_ms=int(timeout * 1000))
        for text in reply.get("warnings") or []:
            if text not in self._warned:  # once each: the records are safe, the run goes on
                self._warned.add(text)
                warnings.warn(f"armoryd: {text}", ArmoryWarning, stacklevel=3)
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


def metric_frame_head(handle: str) -> bytes:
    """The start of a run's metric frames, `{"op":"log","run":<handle>,"metrics":[` (what
    `Connection.send_metric` takes as `run_head`; the one place that spells it)."""
    return ('{"op":"log","run":' + json.dumps(handle) + ',"metrics":[').encode()


def metric_key(key: str) -> bytes:
    """A metric key as `Connection.send_metric` takes it: its JSON and a comma."""
    return (json.dumps(key) + ",").encode()


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
        # The process is exiting: once its connection closes, the daemon need not keep its
        # session for a resume (frames later exit handlers send are still served). The flush
        # that follows carries it to the daemon.
        c.send("bye")
        if wait_upload:
            c.flush("uploaded", timeout=float(wait_upload))
        else:  # bounded even while the daemon is away: the process is exiting
            c.flush("durable", timeout=float(os.environ.get("ARMORY_EXIT_FLUSH_SECONDS", "10")), outage=False)
    except ArmoryError as e:
        print(f"armory_track: {e}", file=sys.stderr)
    except Exception as e:  # exiting: report, never raise
        print(f"armory_track: flush at exit failed: {e}", file=sys.stderr)


atexit.register(_exit_flush)
