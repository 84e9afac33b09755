"""Durability: what armoryd acknowledged survives `kill -9` of the daemon (its journal is replayed
on the next start), lands exactly once, and keeps its run ids; a corrupt journal record is
skipped and counted."""
import glob
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import Daemon, RawClient

BASE_TS = 1795400000000


class StreamingClient:
    """A client that streams 100-metric frames and records which frames the daemon acknowledged."""

    def __init__(self, daemon, name, frames, evaluation="durability"):
        self.c = RawClient(daemon.socket)
        self.c.hello()
        self.c.send("evaluation", id=1, name=evaluation)
        self.c.send("chain", id=2, evaluation=1, name=name)
        self.run = self.c.request("start", chain=2)
        self.frames = frames
        self.seq_of_frame = {}
        self.acked = 0
        self.done = threading.Event()

    def stream(self):
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        try:
            for frame in range(self.frames):
                metrics = [["m", float(frame), frame * 100 + k, BASE_TS + frame * 100 + k] for k in range(100)]
                self.seq_of_frame[frame] = self.c.send("log", run=self.run["handle"], metrics=metrics)
                time.sleep(0.002)
        except OSError:
            pass  # the daemon was killed
        reader.join(timeout=30)
        self.done.set()

    def _read(self):
        try:
            while True:
                message = self.c.recv()
                if message["op"] == "ack":
                    self.acked = max(self.acked, message["upto"])
        except (EOFError, OSError):
            pass

    def acked_steps(self):
        return {frame * 100 + k for frame, seq in self.seq_of_frame.items() if seq <= self.acked for k in range(100)}


def kill_midstream(daemon, clients, min_acked_frames):
    threads = [threading.Thread(target=c.stream) for c in clients]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        # A copy taken at once (under the GIL): the streaming threads add to these dicts meanwhile.
        acked = sum(1 for c in clients for seq in list(c.seq_of_frame.values()) if seq <= c.acked)
        if acked >= min_acked_frames:
            break
        time.sleep(0.01)
    daemon.kill()
    for t in threads:
        t.join(timeout=60)


def wait_drained(daemon, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = daemon.status()
        if status["pending_records"] == 0:
            return status
        time.sleep(0.2)
    raise AssertionError(f"backlog not drained: {daemon.status()}")


def durable_chain_then_kill(home, evaluation, steps=0):
    """Starts a chain run, logs `steps` metrics (each made durable), then SIGKILLs the daemon."""
    daemon = Daemon(home)
    c = RawClient(daemon.socket)
    c.hello()
    c.send("evaluation", id=1, name=evaluation)
    c.send("chain", id=2, evaluation=1, name="chain")
    run = c.request("start", chain=2)
    for step in range(steps):
        c.send("log", run=run["handle"], metrics=[["m", float(step), step, BASE_TS + step]])
        assert c.request("flush", wait="durable", timeout_ms=5000)["complete"]
    assert c.request("flush", wait="durable", timeout_ms=5000)["complete"]
    daemon.kill()
    return run


def test_kill9_local_store_every_acked_metric_lands_exactly_once(tmp_path):
    home = tmp_path / "home"
    daemon = Daemon(home)
    clients = [StreamingClient(daemon, f"c{i}", frames=400) for i in range(4)]
    kill_midstream(daemon, clients, min_acked_frames=300)
    assert all(c.acked > 0 for c in clients)
    restarted = Daemon(home)
    try:
        status = wait_drained(restarted)
        assert status["journal"]["replayed_runs"] >= 5  # the parent and four chains
        for c in clients:
            run_id = c.run["run_id"]  # the local store's ids are assigned at once and kept
            files = glob.glob(str(home / "mlruns" / "*" / run_id / "metrics" / "m"))
            assert len(files) == 1, run_id
            lines = Path(files[0]).read_text().splitlines()
            assert len(lines) == len(set(lines)), "a metric line was written twice"
            steps = {int(line.split()[2]) for line in lines}
            missing = c.acked_steps() - steps
            assert not missing, f"{len(missing)} acknowledged metrics lost"
    finally:
        restarted.stop()


def test_kill9_while_eight_clients_stream_to_a_server_nothing_acked_lost_nothing_twice(tmp_path, mlflow_server):
    home = tmp_path / "home"
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url}
    daemon = Daemon(home, env=env, args=("--flush-interval", "0.2"))
    clients = [StreamingClient(daemon, f"s{i}", frames=125, evaluation="durability-rest") for i in range(8)]  # 100k metrics
    kill_midstream(daemon, clients, min_acked_frames=400)
    restarted = Daemon(home, env=env, args=("--flush-interval", "0.2"))
    try:
        wait_drained(restarted)
        mlflow = MlflowClient(tracking_uri=mlflow_server.url)
        experiment = mlflow.get_experiment_by_name("durability-rest")
        total_acked = 0
        for c in clients:
            runs = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`armory.handle` = '{c.run['handle']}'")
            assert len(runs) == 1, (c.run["handle"], len(runs))  # created exactly once, across the crash
            history = mlflow.get_metric_history(runs[0].info.run_id, "m")
            steps = [m.step for m in history]
            assert len(steps) == len(set(steps))
            acked = c.acked_steps()
            total_acked += len(acked)
            assert not acked - set(steps), f"{len(acked - set(steps))} acknowledged metrics lost"
        assert total_acked >= 40000
    finally:
        restarted.stop()


def test_restored_runs_keep_their_ids_and_end_failed_after_the_grace_period(tmp_path):
    home = tmp_path / "home"
    run = durable_chain_then_kill(home, "restore", steps=1)
    restarted = Daemon(home, args=("--orphan-grace", "1"))
    try:
        active = {r["handle"]: r for r in restarted.status()["active_runs"]}
        assert active[run["handle"]]["run_id"] == run["run_id"]
        deadline = time.time() + 20
        client = MlflowClient(tracking_uri=restarted.store_uri)
        while client.get_run(run["run_id"]).info.status != "FAILED":
            assert time.time() < deadline, "the restored run never ended"
            time.sleep(0.2)
        assert [m.value for m in client.get_metric_history(run["run_id"], "m")] == [0.0]
    finally:
        restarted.stop()


def test_a_reconnecting_client_can_take_a_restored_run_back(tmp_path):
    home = tmp_path / "home"
    run = durable_chain_then_kill(home, "reattach")
    restarted = Daemon(home)
    try:
        again = RawClient(restarted.socket)
        again.hello()
        attached = again.request("attach", run_id=run["run_id"])
        again.send("log", run=attached["handle"], metrics=[["after", 2.0, 0, BASE_TS]])
        again.request("end", run=attached["handle"], status="FINISHED")
        assert again.request("flush", wait="uploaded", timeout_ms=10000)["complete"]
        got = MlflowClient(tracking_uri=restarted.store_uri).get_run(run["run_id"])
        assert got.info.status == "FINISHED" and got.data.metrics["after"] == 2.0
    finally:
        restarted.stop()


def test_a_corrupt_record_is_skipped_counted_and_the_rest_replayed(tmp_path):
    home = tmp_path / "home"
    durable_chain_then_kill(home, "corrupt", steps=3)
    segments = sorted(glob.glob(str(home / "state" / "journal" / "*" / "segment-*.log")), key=os.path.getsize)
    data = bytearray(Path(segments[-1]).read_bytes())
    marker = data.find(b"\x01\x00\x00\x00m")  # the key of a metric record
    data[marker + 6] ^= 0xFF  # flip a byte of its value
    Path(segments[-1]).write_bytes(bytes(data))
    restarted = Daemon(home)
    try:
        status = restarted.status()
        assert status["journal"]["corrupt_records"] == 1
        assert "corrupt_records" in (home / "armoryd.log").read_text()
    finally:
        restarted.stop()
