"""What armory-example must have recorded, checked through the real MLflow client (any backend)."""
import json
import math
import re
import struct
import subprocess
import zlib

import pytest

from conftest import BIN


def run_example(daemon, env=None):
    out = subprocess.run([str(BIN / "armory-example")], env=dict(daemon.env(), **(env or {})), capture_output=True, text=True, timeout=120)
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


def assert_example_recorded(client, parent_id, chain_ids, download_dir):
    """Experiment, parent and nested runs, every param on the right run, histories, artifacts.
    The experiment armoryd (or a sync) created for the evaluation is of MLflow's kind "custom
    model development", so that MLflow's UI opens it on its runs."""
    assert set(chain_ids) == {"benign", "attacked"}
    experiment = client.get_experiment_by_name("armory-example")
    assert experiment is not None and experiment.lifecycle_stage == "active"
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id], max_results=1000)}
    assert {parent_id, *chain_ids.values()} <= set(runs)

    parent = runs[parent_id]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "armory-example"
    assert parent.data.params == {"seed": "42"}
    assert parent.data.tags["mlflow.note.content"] == "Example two-chain evaluation through armoryd"
    assert parent.data.tags["mlflow.source.type"] == "LOCAL"
    assert parent.data.tags["mlflow.source.name"].endswith("armory-example")
    assert parent.data.tags["armory.handle"]
    assert "mlflow.parentRunId" not in parent.data.tags
    assert parent.info.end_time >= parent.info.start_time

    dataset = {"load_dataset._func": "armory_example.load_dataset", "load_dataset.split": "test", "load_dataset.batch_size": "16"}
    for chain, run_id in chain_ids.items():
        run = runs[run_id]
        assert run.info.status == "FINISHED"
        assert run.info.run_name == chain
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["mlflow.runName"] == chain
        weights = "imagenet" if chain == "benign" else "robust-l2"
        expected = {**dataset, "load_model._func": "armory_example.load_model", "load_model.name": "resnet18", "load_model.weights": weights}
        if chain == "attacked":
            expected.update({"Attack._func": "armory_example.Attack.init", "Attack.epsilon": "0.031"})
        assert run.data.params == expected
        history = client.get_metric_history(run_id, "loss")
        assert [m.step for m in history] == list(range(100))
        for m in history:
            assert m.value == pytest.approx(expected_loss(chain, m.step), rel=1e-12)
        assert run.data.metrics["accuracy"] == (0.91 if chain == "benign" else 0.37)
        paths = {a.path for a in client.list_artifacts(run_id, "metrics")} | {a.path for a in client.list_artifacts(run_id, "exports/00000/00")}
        assert paths == {"metrics/accuracy.txt", "exports/00000/00/input.png"}
        accuracy = client.download_artifacts(run_id, "metrics/accuracy.txt", str(download_dir))
        assert json.load(open(accuracy)) == {"value": 0.91 if chain == "benign" else 0.37}
        png = open(client.download_artifacts(run_id, "exports/00000/00/input.png", str(download_dir)), "rb").read()
        noise = chain == "attacked"
        assert decode_png_gray(png) == [[(x * 8 + y * 4 + ((x * y * 37) % 23 if noise else 0)) % 256 for x in range(32)] for y in range(32)]
