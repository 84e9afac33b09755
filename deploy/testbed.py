"""A lab on one machine: PostgreSQL, a real `mlflow server` on it with proxied artifacts, and
several armoryd "hosts", each in its own network namespace reaching the server over a veth link
(or, where the machine does not allow namespaces, separate daemons on loopback, each behind a
forwarder that stands in for its link).

    python deploy/testbed.py --hosts 4          # start it; prints the sockets; Ctrl-C stops it

Tests (`Tests/scale`) and the lab benchmark (`Benchmarks/lab_bench.py`) use the same classes.
Needs: Debian's `postgresql`, `psycopg[binary]` and `mlflow` in the Python environment, a built
`armoryd`; network namespaces need root (CAP_NET_ADMIN).
"""
import argparse
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to a process started with its own session (`start_new_session`) and its children,
    SIGKILL if they are not gone within `timeout`."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def socket_answers(path: str) -> bool:
    """Whether a daemon accepts connections on the Unix socket `path` (a stale file does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def wait_until(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} within {timeout:.0f} s\n{tail}")
        time.sleep(0.1)


class ArmoryDaemon:
    """One armoryd process with its own socket and home: started at once, stopped with SIGTERM or
    killed as a crash would be. The Python suites' fixtures and the lab's hosts are this class.
    No system metrics unless `args` asks (a later `--system-metrics-interval` wins): tests and
    benchmarks count the metrics that reach MLflow exactly."""

    def __init__(self, home: Path, armoryd: Path, args: tuple = (), env: dict | None = None, wrap=None,
                 socket_name: str = "d.sock", drop_env: tuple = ("MLFLOW_TRACKING",), stop_seconds: float = 30):
        self.home = home
        self.armoryd = armoryd
        self.args = tuple(args)
        self.extra_env = env or {}
        self.wrap = wrap  # turns the argv into the command that runs it (a network namespace's)
        self.drop_env = drop_env
        self.stop_seconds = stop_seconds
        home.mkdir(parents=True, exist_ok=True)
        self.socket = str(home / socket_name)
        self.proc = None
        self.start()

    def start(self):
        argv = [str(self.armoryd), "--socket", self.socket, "--home", str(self.home), "--log-level", "info",
                "--system-metrics-interval", "0", *self.args]
        if self.wrap:
            argv = self.wrap(argv)
        env = {k: v for k, v in os.environ.items() if not k.startswith(self.drop_env)}
        env.update(self.extra_env)
        log = self.home / "armoryd.log"
        with open(log, "ab") as out:  # the daemon keeps its own descriptor
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        # A killed daemon's socket file may still be there: wait until one answers.
        wait_until(lambda: self.answers() or self.proc.poll() is not None, 30, "armoryd did not start", log)
        if self.proc.poll() is not None:
            raise RuntimeError("armoryd exited: " + log.read_text(errors="replace")[-3000:])

    def answers(self) -> bool:
        return socket_answers(self.socket)

    def kill(self):
        """SIGKILL, as a crash or the OOM killer would."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        """SIGTERM (SIGKILL past `stop_seconds`); the exit status."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_seconds)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class MLflowServer:
    """A real `mlflow server` (SQLite backend, proxied artifacts) on a free loopback port."""

    def __init__(self, directory: Path, extra_args=(), env=None):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        mlflow_cli = os.path.join(os.path.dirname(sys.executable), "mlflow")
        self.log = open(directory / "mlflow.log", "wb")
        self.proc = subprocess.Popen(
            [mlflow_cli, "server", "--backend-store-uri", f"sqlite:///{directory}/mlflow.db",
             "--artifacts-destination", str(directory / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "2", *extra_args],
            cwd=directory, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(os.environ, **(env or {})), start_new_session=True,
        )
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.read().strip() == b"OK":
                        break
            except Exception:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow server did not start: " + (directory / "mlflow.log").read_text()[-2000:])
            time.sleep(0.5)

    def stop(self):
        stop_group(self.proc, timeout=20)
        self.log.close()


class PostgreSQL:
    """A throwaway PostgreSQL cluster from Debian's packages: trust auth, loopback, a free port."""

    def __init__(self, directory: Path):
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not binaries:
            raise RuntimeError("PostgreSQL is not installed: apt-get install -y postgresql (make bootstrap does)")
        self.bin = Path(binaries[-1]).parent
        # initdb refuses to run as root: the cluster then belongs to the `postgres` user, in a
        # directory of its own that user can reach (a test's directory may not be).
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            directory = Path(tempfile.mkdtemp(prefix="armory-lab-postgresql-"))
            shutil.chown(directory, "postgres")
            self.owned = directory
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self.owned = None
        self.directory = directory
        self.data = directory / "data"
        self.port = free_port()
        self.log = directory / "postgresql.log"
        self._run(self.bin / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
        self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "start",
                  "-o", f"-p {self.port} -k {directory} -h 127.0.0.1 -c max_connections=200")
        self.uri_base = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def _run(self, *argv):
        result = subprocess.run([*self.as_user, *map(str, argv)], stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=self.directory)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{Path(str(argv[0])).name} failed ({result.returncode}): {result.stdout}{result.stderr}{log}")

    def create_database(self, name: str) -> str:
        """A new database; returns its SQLAlchemy URI."""
        self._run(self.bin / "createdb", "-h", self.directory, "-p", self.port, "-U", "postgres", name)
        return f"{self.uri_base}/{name}"

    def stop(self):
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.directory)
        if self.owned:
            shutil.rmtree(self.owned, ignore_errors=True)


class LabServer:
    """A real `mlflow server` on PostgreSQL with proxied artifacts, listening on `host`."""

    def __init__(self, directory: Path, backend_uri: str, host: str, workers: int = 4):
        self.directory = directory
        self.backend_uri = backend_uri
        self.host = host
        self.workers = workers
        self.port = free_port(host)
        self.proc = None
        directory.mkdir(parents=True, exist_ok=True)
        self.start()

    @property
    def local_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.local_url + "/health", timeout=2) as r:
                return r.read().strip() == b"OK"
        except Exception:
            return False

    def start(self):
        mlflow = Path(sys.executable).parent / "mlflow"
        log = open(self.directory / "mlflow.log", "ab")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", self.backend_uri, "--artifacts-destination", str(self.directory / "artifacts"),
             "--serve-artifacts", "--host", self.host, "--port", str(self.port), "--workers", str(self.workers)],
            cwd=self.directory, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        wait_until(lambda: self.healthy() or self.proc.poll() is not None, 180, "mlflow server did not answer /health", self.directory / "mlflow.log")
        if self.proc.poll() is not None:
            raise RuntimeError("mlflow server exited: " + (self.directory / "mlflow.log").read_text()[-3000:])

    def stop(self):
        if self.proc:
            stop_group(self.proc, timeout=30)


class Forwarder:
    """A TCP forwarder that stands in for a host's network link where namespaces are not
    available: `down()` drops every connection and refuses new ones, `up()` restores it."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.listener.listen(128)
        self.is_up = True
        self.connections = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.is_up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def down(self):
        self.is_up = False
        with self.lock:
            for s in self.connections:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.connections.clear()

    def up(self):
        self.is_up = True

    def close(self):
        self.down()
        self.listener.close()


class NetworkNamespaceLink:
    """A host's own network namespace, joined to the server's side by a veth pair."""

    def __init__(self, name: str, host_address: str, server_address: str):
        self.name = name
        self.outer = name[:11] + "-o"
        self.server_address = server_address
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            for argv in (["ip", "link", "add", self.outer, "type", "veth", "peer", "name", "eth0", "netns", name],
                         ["ip", "addr", "add", f"{server_address}/30", "dev", self.outer],
                         ["ip", "link", "set", self.outer, "up"],
                         ["ip", "-n", name, "addr", "add", f"{host_address}/30", "dev", "eth0"],
                         ["ip", "-n", name, "link", "set", "eth0", "up"],
                         ["ip", "-n", name, "link", "set", "lo", "up"]):
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except subprocess.CalledProcessError:
            self.close()
            raise

    def command(self, argv: list) -> list:
        return ["ip", "netns", "exec", self.name, *argv]

    def down(self):
        subprocess.run(["ip", "link", "set", self.outer, "down"], check=True)

    def up(self):
        subprocess.run(["ip", "link", "set", self.outer, "up"], check=True)

    def close(self):
        subprocess.run(["ip", "link", "del", self.outer], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "del", self.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def namespaces_available() -> bool:
    """Whether this machine lets us create network namespaces (root with CAP_NET_ADMIN)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        return False
    probe = f"armory-probe-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", probe], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return True


class LabHost(ArmoryDaemon):
    """One lab host: an armoryd with its own socket and state directory, uploading to the lab's
    server over the host's link."""

    def __init__(self, index: int, home: Path, armoryd: Path, link, server_url: str, extra_args: tuple = ()):
        self.index = index
        self.link = link
        self.server_url = server_url
        # `ip netns exec` execs armoryd: the pid is the daemon's.
        wrap = link.command if isinstance(link, NetworkNamespaceLink) else None
        super().__init__(home, armoryd, args=("--tracking-uri", server_url, *extra_args), wrap=wrap, socket_name="armoryd.sock",
                         drop_env=("MLFLOW_TRACKING", "ARMORY_"), stop_seconds=45)

    def client_env(self) -> dict:
        """The environment of an evaluation on this host."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "ARMORY_"))}
        return dict(env, ARMORY_SOCKET=self.socket, ARMORY_SYSTEM_METRICS="off")


class Lab:
    """PostgreSQL, the MLflow server on it, and `hosts` armoryd hosts."""

    def __init__(self, directory: Path, hosts: int, armoryd: Path | None = None, namespaces: bool | None = None,
                 host_args: tuple = (), workers: int = 4):
        self.directory = directory
        self.armoryd = armoryd or Path(os.environ.get("ARMORY_BIN", ROOT / ".build" / "debug")) / "armoryd"
        if not self.armoryd.exists():
            raise RuntimeError(f"{self.armoryd} is missing: run `swift build` (or `make build`) first")
        if namespaces is None:  # ARMORY_LAB_NAMESPACES=0 forces the loopback form where namespaces work
            namespaces = os.environ.get("ARMORY_LAB_NAMESPACES", "1") != "0" and namespaces_available()
        self.namespaces = namespaces
        self.hosts: list[LabHost] = []
        self.postgres = None
        self.server = None
        self.links = []
        self.host_args = host_args
        try:
            self.postgres = PostgreSQL(directory / "postgresql")
            backend = self.postgres.create_database("mlflow")
            self.server = LabServer(directory / "mlflow", backend, "0.0.0.0" if self.namespaces else "127.0.0.1", workers)
            for i in range(hosts):
                self.add_host()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """The server as this machine (the test, the MLflow client) reaches it."""
        return self.server.local_url

    def add_host(self) -> LabHost:
        i = len(self.hosts)
        if self.namespaces:
            # One /30 per host out of 10.213.0.0/16; names carry the pid so that testbeds can coexist.
            tag = f"al{os.getpid() % 100000}h{i}"
            subnet = (os.getpid() % 64) * 1024 + i * 4
            prefix = f"10.213.{subnet // 256}."
            link = NetworkNamespaceLink(tag, prefix + str(subnet % 256 + 2), prefix + str(subnet % 256 + 1))
            url = f"http://{link.server_address}:{self.server.port}"
        else:
            link = Forwarder(self.server.port)
            url = f"http://127.0.0.1:{link.port}"
        self.links.append(link)
        host = LabHost(i, self.directory / f"host{i}", self.armoryd, link, url, self.host_args)
        self.hosts.append(host)
        return host

    def close(self):
        for host in self.hosts:
            host.stop()
        for link in self.links:
            link.close()
        if self.server:
            self.server.stop()
        if self.postgres:
            self.postgres.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--dir", help="where the lab keeps its state (default: a new temporary directory)")
    parser.add_argument("--no-namespaces", action="store_true", help="separate daemons on loopback even where namespaces work")
    args = parser.parse_args()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="armory-lab-"))
    lab = Lab(directory, args.hosts, namespaces=False if args.no_namespaces else None)
    print(f"PostgreSQL: {lab.postgres.uri_base}/mlflow")
    print(f"MLflow server: {lab.url} (state in {directory})")
    for host in lab.hosts:
        where = f"namespace {host.link.name}" if lab.namespaces else "loopback"
        print(f"host {host.index}: ARMORY_SOCKET={host.socket}  ({where}, uploading to {host.server_url})")
    print("Ctrl-C stops the lab.")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        lab.close()


if __name__ == "__main__":
    main()
