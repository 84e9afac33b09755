"""The local store written by armoryd, read back with the real MLflow client (3.17.2)."""
import hashlib
import json
import os
import re
import subprocess

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import BIN, RawClient
from examplecheck import assert_example_recorded, run_example


def test_example_evaluation_reads_back_with_the_real_mlflow_client(daemon, tmp_path):
    parent_id, chain_ids = run_example(daemon)
    assert_example_recorded(MlflowClient(tracking_uri=daemon.store_uri), parent_id, chain_ids, tmp_path)


def test_meta_files_are_what_pyyaml_and_mlflow_expect(daemon):
    parent_id, chain_ids = run_example(daemon)
    for path in daemon.store.rglob("meta.yaml"):
        meta = yaml.safe_load(path.read_text())
        assert isinstance(meta["experiment_id"], str)
        if "run_id" in meta:
            assert meta["run_id"] == path.parent.name
            assert isinstance(meta["run_id"], str)
            assert meta["artifact_uri"] == "file://" + str(path.parent / "artifacts")
            assert meta["source_type"] == 4 and meta["lifecycle_stage"] == "active"
        else:
            assert meta["experiment_id"] == path.parent.name
            assert meta["artifact_location"] == "file://" + str(path.parent)
    # Raw files: no trailing newline on params and tags, "<ts> <value> <step>" metric lines.
    run_dir = next(daemon.store.rglob(chain_ids["benign"]))
    assert (run_dir / "params" / "load_model.weights").read_bytes() == b"imagenet"
    assert (run_dir / "tags" / "mlflow.runName").read_bytes() == b"benign"
    first = (run_dir / "metrics" / "loss").read_text().splitlines()[0]
    assert re.fullmatch(r"\d{13} 2\.05 0", first)


def test_mlflow_migrate_filestore_accepts_the_store(daemon, tmp_path):
    parent_id, chain_ids = run_example(daemon)
    db = tmp_path / "migrated.db"
    mlflow_cli = os.path.join(os.path.dirname(os.sys.executable), "mlflow")
    out = subprocess.run([mlflow_cli, "migrate-filestore", "--source", str(daemon.store), "--target", f"sqlite:///{db}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("armory-example")
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {parent_id, *chain_ids.values()}
    assert len(client.get_metric_history(chain_ids["benign"], "loss")) == 100
    assert runs[chain_ids["attacked"]].data.tags["mlflow.parentRunId"] == parent_id


def test_resume_by_run_id_with_mlflow_reads_the_same_run(daemon):
    parent_id, chain_ids = run_example(daemon)
    # The seeds' flow: resume a chain's run by id with MLflow itself (on the local store).
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(daemon.store_uri)
    try:
        with mlflow.start_run(run_id=chain_ids["benign"]):
            mlflow.log_metric("custom_metric", 42)
    finally:
        mlflow.set_tracking_uri(previous or "")
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
    run = MlflowClient(tracking_uri=daemon.store_uri).get_run(chain_ids["benign"])
    assert run.data.metrics["custom_metric"] == 42
    assert run.data.params["load_model.weights"] == "imagenet"


def test_large_artifact_streams_through_in_constant_memory(daemon):
    size = 200 * 1024 * 1024
    chunk = 1024 * 1024
    client = RawClient(daemon.socket)
    client.hello()
    client.send("evaluation", id=1, name="big-artifact")
    run = client.request("start", evaluation=1)
    artifact = client.request("artifact_open", run=run["handle"], path="data/blob.bin")["artifact"]
    digest = hashlib.sha256()
    import base64
    for i in range(size // chunk):
        block = bytes([i % 251]) * chunk
        digest.update(block)
        client.send("artifact_chunk", artifact=artifact, data=base64.b64encode(block).decode())
    closed = client.request("artifact_close", artifact=artifact)
    assert closed["bytes"] == size
    client.request("flush", wait="uploaded", timeout_ms=60000)
    stored = next(daemon.store.rglob("blob.bin"))
    h = hashlib.sha256()
    with open(stored, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    assert h.hexdigest() == digest.hexdigest()
    peak_kb = int(re.search(r"VmHWM:\s+(\d+) kB", open(f"/proc/{daemon.proc.pid}/status").read()).group(1))
    assert peak_kb < 150 * 1024, f"daemon peak RSS {peak_kb} kB while streaming 200 MB"
    client.close()
