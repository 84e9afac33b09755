"""`armoryctl sync`: local runs copied into a real `mlflow server`, exactly once, and resumed."""
import json
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from conftest import BIN
from examplecheck import assert_example_recorded, run_example


def sync(daemon, to, *args):
    out = subprocess.run([str(BIN / "armoryctl"), "sync", "--to", to, "--json", "--socket", daemon.socket, *args],
                         capture_output=True, text=True, timeout=300, env=daemon.env())
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def copies(client, experiment_name):
    """The destination's copies in an experiment, by their source run id (the server is shared:
    other tests' runs may be in an experiment of the same name)."""
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id], max_results=5000)
    return {r.data.tags["armory.sync.source_run"]: r for r in runs if "armory.sync.source_run" in r.data.tags}


@pytest.mark.parametrize("into", ["server", "store"])
def test_the_example_synced_twice_lands_once_and_a_grown_run_sends_only_what_is_new(daemon, mlflow_server, tmp_path, into):
    """Into the MLflow server, and (same checks) into another local store, read by MLflow's client."""
    parent, chains = run_example(daemon)
    written = lambda: daemon.status()["metrics_written"]  # noqa: E731
    before = written()
    to, url = (mlflow_server.url, mlflow_server.url) if into == "server" else (str(tmp_path / "carried"), f"file://{tmp_path / 'carried'}")

    server = MlflowClient(url)
    dry = sync(daemon, to, "--dry-run")  # says what it would copy, sends nothing
    assert dry["state"] == "complete" and dry["runs_total"] == 3 and all(r["created"] for r in dry["runs"]), dry
    assert dry["metrics_total"] > 0 and dry["metrics_queued"] == dry["runs_created"] == 0
    assert server.get_experiment_by_name("armory-example") is None or not set(copies(server, "armory-example")) & {parent, *chains.values()}

    job = sync(daemon, to)
    assert job["state"] == "complete" and job["runs_total"] == 3 and job["runs_created"] == 3, job
    assert job["metrics_landed"] == job["metrics_total"] == dry["metrics_total"]
    copied = copies(server, "armory-example")
    assert set(copied) == {parent, *chains.values()}
    assert all(r.data.tags["armory.sync.state"] == "complete" for r in copied.values())
    # Everything the example recorded, read back from the server under the copies' ids.
    # (The experiment, created by the sync or by an earlier test's evaluation, is of the kind
    # MLflow's UI opens on its runs.)
    assert_example_recorded(server, copied[parent].info.run_id, {c: copied[r].info.run_id for c, r in chains.items()}, tmp_path / "dl")
    source = MlflowClient(daemon.store_uri)
    for run_id, copy in copied.items():
        original = source.get_run(run_id)
        assert copy.data.params == original.data.params
        assert copy.info.start_time == original.info.start_time and copy.info.end_time == original.info.end_time
        for key in original.data.metrics:
            points = lambda c, r: sorted((m.step, m.timestamp, m.value) for m in c.get_metric_history(r, key))  # noqa: E731
            assert points(server, copy.info.run_id) == points(source, run_id)
    uploaded = written() - before
    assert uploaded == job["metrics_queued"] > 0

    # Twice: nothing created, nothing sent.
    again = sync(daemon, to)
    assert again["runs_up_to_date"] == 3 and again["runs_created"] == 0 and again["metrics_queued"] == 0, again
    assert written() - before == uploaded
    assert len(copies(server, "armory-example")) == 3

    # A run grows (here by MLflow's own client on the store): exactly the new points arrive.
    benign = chains["benign"]
    now = int(time.time() * 1000)
    source.log_batch(benign, metrics=[Metric("late", float(i), now + i, i) for i in range(1000)])
    grown = sync(daemon, to)
    assert grown["metrics_queued"] == 1000 and grown["runs_up_to_date"] == 2, grown
    assert written() - before == uploaded + 1000
    history = server.get_metric_history(copied[benign].info.run_id, "late")
    assert sorted(m.step for m in history) == list(range(1000))
    jobs = daemon.status()["syncs"]  # `armoryctl status` shows the jobs too
    assert [j["state"] for j in jobs] == ["complete"] * 4 and jobs[-1]["metrics_queued"] == 1000  # the dry run is one


def test_sync_refuses_what_it_cannot_do(daemon, mlflow_server, tmp_path):
    (tmp_path / "not-a-store").mkdir()
    out = subprocess.run([str(BIN / "armoryctl"), "sync", "--to", mlflow_server.url, "--from", str(tmp_path / "not-a-store"), "--socket", daemon.socket],
                         capture_output=True, text=True, timeout=60, env=daemon.env())
    assert out.returncode == 1 and "not an MLflow file store" in out.stderr
    out = subprocess.run([str(BIN / "armoryctl"), "sync", "--socket", daemon.socket], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--to" in out.stderr
    out = subprocess.run([str(BIN / "armoryctl"), "sync", "--to", str(daemon.store), "--socket", daemon.socket],
                         capture_output=True, text=True, timeout=60, env=daemon.env())
    assert out.returncode == 1 and "both the source and the destination" in out.stderr, out.stderr


def mlflow_written_store(path, experiment, runs, points):
    """A store written by MLflow's own client (not by armoryd): `runs` runs of `points` points."""
    client = MlflowClient(f"file://{path}")
    experiment_id = client.create_experiment(experiment)
    now = int(time.time() * 1000)
    for r in range(runs):
        run = client.create_run(experiment_id, run_name=f"r{r}")
        client.log_param(run.info.run_id, "index", str(r))
        for start in range(0, points, 1000):
            client.log_batch(run.info.run_id, metrics=[Metric("m", float(r * points + i), now + i, i) for i in range(start, min(points, start + 1000))])
        client.set_terminated(run.info.run_id)
    return path


def start_sync(daemon, to, store):
    return subprocess.Popen([str(BIN / "armoryctl"), "sync", "--to", to, "--from", str(store), "--json", "--socket", daemon.socket],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=daemon.env())


def check_copied(server_url, experiment, runs, points):
    server = MlflowClient(server_url)
    copied = copies(server, experiment)
    assert len(copied) == runs and len(server.search_runs([server.get_experiment_by_name(experiment).experiment_id], max_results=5000)) == runs
    for run in copied.values():
        assert run.data.tags["armory.sync.state"] == "complete" and run.info.status == "FINISHED"
        history = server.get_metric_history(run.info.run_id, "m")
        r = int(run.data.params["index"])
        assert sorted((m.step, m.value) for m in history) == [(i, float(r * points + i)) for i in range(points)]


def test_sync_killed_mid_way_resumes_without_duplicates(tmp_path, mlflow_server):
    from conftest import Daemon
    from faultproxy import FaultProxy
    store = mlflow_written_store(tmp_path / "carried", "sync-crash", runs=20, points=10_000)
    proxy = FaultProxy(mlflow_server.port)  # counts the metrics that reach the server
    daemon = Daemon(tmp_path / "d")
    try:
        job = start_sync(daemon, proxy.url, store)
        deadline = time.time() + 120
        while proxy.metrics_forwarded < 20_000 and time.time() < deadline:
            time.sleep(0.1)
        assert proxy.metrics_forwarded >= 20_000, "the sync did not get going"
        daemon.proc.kill()
        daemon.proc.wait()
        job.wait(timeout=30)
        assert proxy.metrics_forwarded < 200_000  # killed mid-way
        daemon = Daemon(tmp_path / "d")  # the same state directory: its journal replays
        out = start_sync(daemon, proxy.url, store)
        stdout, stderr = out.communicate(timeout=300)
        assert out.returncode == 0, stdout + stderr
        check_copied(proxy.url, "sync-crash", 20, 10_000)
        assert proxy.metrics_forwarded == 200_000  # every point sent once, across the kill
    finally:
        daemon.stop()
        proxy.close()


def test_a_repeated_sync_reads_no_metric_history_the_copy_records_as_landed(daemon, mlflow_server, tmp_path):
    """Each copy records what landed (`armory.sync.landed`): a later sync reads a key's history
    only where that record is missing, not every point of every run each time."""
    from faultproxy import FaultProxy
    experiment = f"sync-landed-{uuid.uuid4().hex[:8]}"
    store = mlflow_written_store(tmp_path / "carried", experiment, runs=4, points=3000)
    proxy = FaultProxy(mlflow_server.port)
    histories = lambda: proxy.forwarded.get("/api/2.0/mlflow/metrics/get-history", 0)  # noqa: E731
    try:
        first = run_sync(daemon, proxy.url, store)
        assert first.returncode == 0, first.stdout + first.stderr
        server = MlflowClient(mlflow_server.url)
        copied = copies(server, experiment)
        assert {json.loads(r.data.tags["armory.sync.landed"])["m"] for r in copied.values()} == {3000}
        assert histories() == 0  # new copies: nothing to read

        again = json.loads(run_sync(daemon, proxy.url, store).stdout)
        assert again["runs_up_to_date"] == 4 and again["metrics_queued"] == 0, again
        assert histories() == 0

        # A run grows: only its new points go, still without reading its history.
        source = MlflowClient(f"file://{store}")
        grown = sorted(copied)[0]
        now = int(time.time() * 1000)
        source.log_batch(grown, metrics=[Metric("m", -1.0, now + i, 3000 + i) for i in range(500)])
        more = json.loads(run_sync(daemon, proxy.url, store).stdout)
        assert more["metrics_queued"] == 500 and more["runs_up_to_date"] == 3, more
        assert histories() == 0
        assert json.loads(server.get_run(copied[grown].info.run_id).data.tags["armory.sync.landed"]) == {"m": 3500}
        assert len(server.get_metric_history(copied[grown].info.run_id, "m")) == 3500

        # A copy without the record (an older armoryd's, say): its history is read once, the record written.
        server.delete_tag(copied[grown].info.run_id, "armory.sync.landed")
        healed = json.loads(run_sync(daemon, proxy.url, store).stdout)
        assert healed["metrics_queued"] == 0 and healed["state"] == "complete", healed
        assert histories() == 1
        assert json.loads(server.get_run(copied[grown].info.run_id).data.tags["armory.sync.landed"]) == {"m": 3500}
        run_sync(daemon, proxy.url, store)
        assert histories() == 1
    finally:
        proxy.close()


def test_an_interrupted_armoryctl_leaves_the_sync_running(daemon, mlflow_server, tmp_path):
    experiment = f"sync-bg-{uuid.uuid4().hex[:8]}"
    job = start_sync(daemon, mlflow_server.url, mlflow_written_store(tmp_path / "carried", experiment, runs=4, points=20_000))

    def status():
        out = subprocess.run([str(BIN / "armoryctl"), "sync", "--status", "--json", "--socket", daemon.socket], capture_output=True, text=True, check=True)
        jobs = json.loads(out.stdout)["jobs"]
        return jobs[-1] if jobs else {"state": "not started yet", "metrics_landed": 0}

    deadline = time.time() + 60
    while status()["metrics_landed"] == 0 and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    job.wait(timeout=10)
    assert status()["state"] != "complete"  # interrupted mid-way...
    deadline = time.time() + 300
    while status()["state"] not in ("complete", "failed") and time.time() < deadline:
        time.sleep(0.2)
    assert status()["state"] == "complete" and status()["metrics_landed"] == 80_000  # ...and finished in the daemon
    check_copied(mlflow_server.url, experiment, 4, 20_000)


def test_sync_waits_out_a_destination_outage(tmp_path, mlflow_server):
    from conftest import Daemon
    from faultproxy import FaultProxy
    store = mlflow_written_store(tmp_path / "carried", "sync-outage", runs=5, points=20_000)
    proxy = FaultProxy(mlflow_server.port)
    daemon = Daemon(tmp_path / "d", args=("--request-timeout", "2"))
    try:
        job = start_sync(daemon, proxy.url, store)
        deadline = time.time() + 120
        while proxy.metrics_forwarded == 0 and time.time() < deadline:
            time.sleep(0.05)
        # Down for 20 s: no new connections, and 503 on the ones the daemon keeps open.
        proxy.stop_listening()
        outage_ends = time.time() + 20
        while time.time() < outage_ends:
            with proxy.lock:
                proxy.faults[:] = [("/api/", ("status", 503, None))] * 100
            time.sleep(0.05)
        with proxy.lock:
            proxy.faults.clear()
        assert job.poll() is None  # still waiting
        assert proxy.faults_served > 0 and proxy.metrics_forwarded < 100_000  # the outage hit mid-sync
        proxy.start()
        stdout, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stdout + stderr
        assert json.loads(stdout)["state"] == "complete"
        check_copied(proxy.url, "sync-outage", 5, 20_000)
    finally:
        daemon.stop()
        proxy.close()


def run_sync(daemon, to, store, env=None, timeout=300):
    return subprocess.run([str(BIN / "armoryctl"), "sync", "--to", to, "--from", str(store), "--json", "--socket", daemon.socket],
                          capture_output=True, text=True, timeout=timeout, env=dict(daemon.env(), **(env or {})))


def test_refused_credentials_and_an_unreachable_server_are_clear_errors(daemon, mlflow_auth_server, tmp_path):
    store = mlflow_written_store(tmp_path / "carried", f"sync-auth-{uuid.uuid4().hex[:8]}", runs=1, points=10)
    out = run_sync(daemon, mlflow_auth_server.url, store, env={"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong"})
    assert out.returncode == 1 and "401" in out.stderr and "MLFLOW_TRACKING_USERNAME" in out.stderr, out.stderr
    assert "wrong" not in out.stdout + out.stderr
    job = json.loads(out.stdout)
    assert job["state"] == "failed" and job["runs_created"] == 0

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.time()
    out = run_sync(daemon, f"http://127.0.0.1:{port}", store, timeout=120)
    assert out.returncode == 1 and "did not answer" in out.stderr and "Check the address" in out.stderr, out.stderr
    assert time.time() - started < 60


def test_a_deleted_experiment_and_a_rejected_record_fail_their_runs_only(daemon, mlflow_server, tmp_path):
    tag = uuid.uuid4().hex[:8]
    gone, kept = f"sync-gone-{tag}", f"sync-kept-{tag}"
    source = MlflowClient(f"file://{tmp_path / 'carried'}")
    runs = {}
    for experiment, names in ((gone, ["g0"]), (kept, ["k0", "k1"])):
        experiment_id = source.create_experiment(experiment)
        for name in names:
            run = source.create_run(experiment_id, run_name=name)
            source.log_metric(run.info.run_id, "m", 1.0, step=0)
            source.set_terminated(run.info.run_id)
            runs[name] = run
    # A metric name MLflow servers refuse, as a hand-edited store may hold.
    k1 = runs["k1"]
    (tmp_path / "carried" / k1.info.experiment_id / k1.info.run_id / "metrics" / "loss@epoch").write_text("1795400000000 0.5 0\n")
    server = MlflowClient(mlflow_server.url)
    server.delete_experiment(server.create_experiment(gone))

    out = run_sync(daemon, mlflow_server.url, tmp_path / "carried")
    assert out.returncode == 1, out.stdout + out.stderr
    job = json.loads(out.stdout)
    assert job["state"] == "failed" and len(job["failures"]) == 2, job
    assert "deleted" in out.stderr and "mlflow experiments restore" in out.stderr and "loss@epoch" in out.stderr, out.stderr
    copied = copies(server, kept)
    assert copied[runs["k0"].info.run_id].data.tags["armory.sync.state"] == "complete"
    # The run whose record was refused is there, and says it is not whole.
    assert copied[k1.info.run_id].data.tags["armory.sync.state"] == "partial"


def peak_rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024


def test_a_gigabyte_of_artifacts_syncs_without_the_daemon_growing(tmp_path, mlflow_server):
    from conftest import Daemon
    source = MlflowClient(f"file://{tmp_path / 'carried'}")
    experiment = f"sync-big-{uuid.uuid4().hex[:8]}"
    run = source.create_run(source.create_experiment(experiment), run_name="big")
    source.set_terminated(run.info.run_id)
    artifacts = tmp_path / "carried" / run.info.experiment_id / run.info.run_id / "artifacts" / "weights"
    artifacts.mkdir(parents=True)
    for i in range(4):  # 4 x 256 MiB, each ending in bytes of its own
        with open(artifacts / f"shard-{i}.bin", "wb") as f:
            f.truncate(256 << 20)
            f.seek(-16, 2)
            f.write(f"end of shard {i:3d}".encode())
    daemon = Daemon(tmp_path / "d")
    try:
        before = peak_rss_mb(daemon.proc.pid)
        out = run_sync(daemon, mlflow_server.url, tmp_path / "carried")
        assert out.returncode == 0, out.stdout + out.stderr
        job = json.loads(out.stdout)
        assert job["artifact_bytes_landed"] == job["artifact_bytes_total"] == 4 * (256 << 20)
        # Bounded by the uploads in flight, not by the bytes: 4 lanes of 1 MiB reads grew this debug
        # build by 30-75 MB (malloc arenas of the threads involved; a release build: +16 MB), where
        # one file held whole adds its 256 MiB per lane.
        grown = peak_rss_mb(daemon.proc.pid) - before
        assert grown < 128, f"the daemon grew by {grown:.0f} MB while syncing 1 GiB of artifacts"
        server = MlflowClient(mlflow_server.url)
        (copy,) = copies(server, experiment).values()
        listed = {a.path: a.file_size for a in server.list_artifacts(copy.info.run_id, "weights")}
        assert listed == {f"weights/shard-{i}.bin": 256 << 20 for i in range(4)}
        stored = mlflow_server.directory / "artifacts" / copy.info.experiment_id / copy.info.run_id / "artifacts" / "weights"
        with open(stored / "shard-3.bin", "rb") as f:
            f.seek(-16, 2)
            assert f.read() == b"end of shard   3"
        shutil.rmtree(stored)  # a gigabyte the session's server need not keep
    finally:
        daemon.stop()
