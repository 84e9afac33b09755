"""The local store written by armoryd, read back with the real MLflow client (3.17.2)."""
import hashlib
import json
import math
import os
import re
import struct
import subprocess
import zlib

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import BIN, RawClient


def run_example(daemon):
    out = subprocess.run([str(BIN / "armory-example")], env=daemon.env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ids = dict(re.findall(r"chain (\w+): run ([0-9a-f]{32})", out.stdout))
    parent = re.search(r"parent run ([0-9a-f]{32})", out.stdout).group(1)
    return parent, ids


def decode_png_gray(data: bytes):
    """Decodes the example's 8-bit grayscale PNG (any deflate) into rows of pixel values."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", None, None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind}"
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert (depth, color) == (8, 0)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    rows = []
    for y in range(height):
        line = raw[y * (width + 1):(y + 1) * (width + 1)]
        assert line[0] == 0
        rows.append(list(line[1:]))
    return rows


def expected_loss(chain, step):
    return 2.0 * math.exp(-step / (20 if chain == "benign" else 35)) + 0.05


def test_example_evaluation_reads_back_with_the_real_mlflow_client(daemon, tmp_path):
    parent_id, chain_ids = run_example(daemon)
    assert set(chain_ids) == {"benign", "attacked"}
    client = MlflowClient(tracking_uri=daemon.store_uri)

    experiment = client.get_experiment_by_name("armory-example")
    assert experiment is not None and experiment.lifecycle_stage == "active"
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {parent_id, *chain_ids.values()}

    parent = runs[parent_id]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "armory-example"
    assert parent.data.params == {"seed": "42"}
    assert parent.data.tags["mlflow.note.content"] == "Example two-chain evaluation through armoryd"
    assert parent.data.tags["mlflow.source.type"] == "LOCAL"
    assert parent.data.tags["mlflow.source.name"].endswith("armory-example")
    assert "mlflow.parentRunId" not in parent.data.tags
    assert parent.info.end_time >= parent.info.start_time

    dataset_params = {"load_dataset._func": "armory_example.load_dataset", "load_dataset.split": "test", "load_dataset.batch_size": "16"}
    for chain, run_id in chain_ids.items():
        run = runs[run_id]
        assert run.info.status == "FINISHED"
        assert run.info.run_name == chain
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["mlflow.runName"] == chain
        weights = "imagenet" if chain == "benign" else "robust-l2"
        expected = {**dataset_params, "load_model._func": "armory_example.load_model", "load_model.name": "resnet18", "load_model.weights": weights}
        if chain == "attacked":
            expected.update({"Attack._func": "armory_example.Attack.init", "Attack.epsilon": "0.031"})
        assert run.data.params == expected
        assert "seed" not in run.data.params  # global params go to the parent only

        history = client.get_metric_history(run_id, "loss")
        assert [m.step for m in history] == list(range(100))
        for m in history:
            assert m.value == pytest.approx(expected_loss(chain, m.step), rel=1e-12)
        assert [m.timestamp for m in history] == sorted(m.timestamp for m in history)
        assert run.data.metrics["accuracy"] == (0.91 if chain == "benign" else 0.37)

        paths = {a.path for a in client.list_artifacts(run_id, "metrics")} | {a.path for a in client.list_artifacts(run_id, "exports/00000/00")}
        assert paths == {"metrics/accuracy.txt", "exports/00000/00/input.png"}
        accuracy = client.download_artifacts(run_id, "metrics/accuracy.txt", str(tmp_path))
        assert json.load(open(accuracy)) == {"value": 0.91 if chain == "benign" else 0.37}
        png = open(client.download_artifacts(run_id, "exports/00000/00/input.png", str(tmp_path)), "rb").read()
        rows = decode_png_gray(png)
        noise = chain == "attacked"
        assert rows == [[(x * 8 + y * 4 + ((x * y * 37) % 23 if noise else 0)) % 256 for x in range(32)] for y in range(32)]


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
    mlflow.set_tracking_uri(daemon.store_uri)
    with mlflow.start_run(run_id=chain_ids["benign"]):
        mlflow.log_metric("custom_metric", 42)
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
