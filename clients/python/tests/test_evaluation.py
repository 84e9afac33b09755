"""Evaluations end to end: armoryd writes the local store, the real MLflow client reads it."""
import json
import os
import subprocess
import sys
import threading

import pytest
from mlflow.tracking import MlflowClient

import armory_track
from armory_track import ArmoryError, Evaluation, Trackable, attach, track_param
from armory_track._connection import Connection


class Dataset(Trackable):
    def __init__(self, name, batch_size):
        super().__init__()
        self.name = name


class Model(Trackable):
    def __init__(self, weights):
        super().__init__()


def client(daemon):
    """The real MLflow client on the daemon's store, once everything sent is in it."""
    armory_track.flush("uploaded")
    return MlflowClient(tracking_uri="file://" + str(daemon.store))


def test_chain_merge_order_and_global_params(daemon):
    track_param("seed", 1)
    evaluation = Evaluation("merge-order", description="about")
    with evaluation.autotrack() as track:
        dataset = track(Dataset, name="d", batch_size=16)
    evaluation.use_dataset(dataset)
    with evaluation.add_chain("c") as chain:
        track_param("shared", "chain")
        chain.use_model(chain.track_call(Model, weights="w"))
    params = chain.get_tracked_params()
    assert params["Dataset.batch_size"] == "16" and params["Model.weights"] == "w" and params["shared"] == "chain"
    with evaluation.run():
        with chain.run():
            chain.log_metric("m", 1.0, step=0)
    c = client(daemon)
    run = c.get_run(chain.run_id)
    assert run.data.params == params
    parent = c.get_run(evaluation.run_id)
    assert parent.data.params == {"seed": "1"}
    assert parent.data.tags["mlflow.note.content"] == "about"
    assert run.data.tags["mlflow.parentRunId"] == evaluation.run_id


def test_exceptions_mark_runs_failed(daemon):
    evaluation = Evaluation("failing")
    with evaluation.add_chain("c") as chain:
        pass
    with pytest.raises(ValueError):
        with evaluation.run():
            with chain.run():
                raise ValueError("boom")
    c = client(daemon)
    assert c.get_run(chain.run_id).info.status == "FAILED"
    assert c.get_run(evaluation.run_id).info.status == "FAILED"


def test_metrics_artifacts_and_resume_by_run_id(daemon, tmp_path):
    evaluation = Evaluation("artifacts")
    with evaluation.add_chain("c") as chain:
        pass
    with evaluation.run():
        for step in range(50):
            chain.log_metric("loss", 1.0 / (step + 1), step=step)
        chain.log_metrics({"a": 1.0, "nan": float("nan"), "inf": float("inf")}, step=3)
        chain.log_dict({"value": 0.9}, "metrics/accuracy.txt")
        chain.log_text("hello", "notes/readme.txt")
        f = tmp_path / "input.png"
        f.write_bytes(bytes(range(256)) * 40)
        chain.log_artifact(str(f), "exports/00000/00")
        f.unlink()  # the daemon already holds its copy
    run_id = chain.run_id
    resumed = attach(run_id)
    resumed.log_metric("custom_metric", 42)
    resumed.end()
    c = client(daemon)
    assert [m.step for m in c.get_metric_history(run_id, "loss")] == list(range(50))
    data = c.get_run(run_id).data
    assert data.metrics["custom_metric"] == 42 and data.metrics["inf"] == float("inf")
    assert json.load(open(c.download_artifacts(run_id, "metrics/accuracy.txt", str(tmp_path)))) == {"value": 0.9}
    assert open(c.download_artifacts(run_id, "exports/00000/00/input.png", str(tmp_path)), "rb").read() == bytes(range(256)) * 40


def test_changed_params_raise_at_chain_end_with_the_key(daemon):
    evaluation = Evaluation("changed")
    with evaluation.add_chain("c") as chain:
        pass
    chain.log_param("lr", 0.1)
    chain.log_param("lr", 0.2)
    with pytest.raises(ArmoryError) as raised:
        chain.end()
    assert raised.value.errors[0]["code"] == "PARAM_CHANGED" and "'lr'" in str(raised.value)


def test_threads_share_the_connection_safely(daemon):
    evaluation = Evaluation("threads")
    with evaluation.add_chain("c") as chain:
        pass
    chain.start()

    def work(t):
        for i in range(500):
            chain.log_metric(f"t{t}", float(i), step=i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    evaluation.end()
    armory_track.flush("uploaded")
    c = client(daemon)
    for t in range(8):
        assert [m.step for m in c.get_metric_history(chain.run_id, f"t{t}")] == list(range(500))


def test_a_forked_child_opens_its_own_connection(daemon):
    track_param("parent", 1)
    pid = os.fork()
    if pid == 0:  # child: a fresh session of its own
        try:
            ok = armory_track.get_current_params() == {}
            track_param("child", 2)
            ok = ok and armory_track.get_current_params() == {"child": "2"}
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert armory_track.get_current_params() == {"parent": "1"}


def test_concurrent_evaluation_processes_are_isolated(daemon, tmp_path):
    script = tmp_path / "eval.py"
    script.write_text(
        "import sys\n"
        "from armory_track import Evaluation, track_param, get_current_params\n"
        "i = sys.argv[1]\n"
        "track_param('who', i)\n"
        "ev = Evaluation('isolated')\n"
        "with ev.add_chain('c' + i) as chain:\n"
        "    pass\n"
        "with ev.run():\n"
        "    for s in range(200): chain.log_metric('m', float(i), step=s)\n"
        "assert get_current_params() == {'who': i}\n"
        "print(ev.run_id, chain.run_id)\n")
    procs = [subprocess.Popen([sys.executable, str(script), str(i)], stdout=subprocess.PIPE, text=True) for i in range(6)]
    results = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    armory_track.flush("uploaded")
    c = client(daemon)
    for i, (parent, chain) in enumerate(results):
        assert c.get_run(parent).data.params == {"who": str(i)}
        assert {m.value for m in c.get_metric_history(chain, "m")} == {float(i)}


def test_a_process_that_exits_without_ending_still_flushes_and_its_runs_end_failed(daemon, tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(
        "import os\n"
        "from armory_track import Evaluation\n"
        "ev = Evaluation('vanished')\n"
        "with ev.add_chain('c') as chain:\n"
        "    pass\n"
        "for s in range(100): chain.log_metric('m', 1.0, step=s)\n"
        "print(chain.run_id, flush=True)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    run_id = out.stdout.strip()
    import time

    time.sleep(2.5)  # the test daemon's --orphan-grace is 1 s
    armory_track.flush("uploaded")
    run = client(daemon).get_run(run_id)
    assert run.info.status == "FAILED"
    assert len(client(daemon).get_metric_history(run_id, "m")) == 100


def test_no_daemon_is_a_clear_connection_error(tmp_path):
    with pytest.raises(ConnectionError) as raised:
        Connection(str(tmp_path / "none.sock"))
    assert str(tmp_path / "none.sock") in str(raised.value) and "armoryd &" in str(raised.value)


def test_importing_does_not_import_mlflow():
    out = subprocess.run([sys.executable, "-c", "import sys, armory_track; print('mlflow' in sys.modules)"], capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_the_example_evaluation_lands(daemon):
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "armory_example.py")
    out = subprocess.run([sys.executable, example], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    chains = dict(line.split(": run ") for line in out.stdout.splitlines() if "chain" in line)
    c = client(daemon)
    benign = c.get_run(chains["  chain benign"])
    attacked = c.get_run(chains["  chain attacked"])
    assert benign.data.params["load_dataset.split"] == "test" and benign.data.params["Classifier.weights"] == "imagenet"
    assert attacked.data.params["PGD.epsilon"] == "0.031" and "PGD.epsilon" not in benign.data.params
    assert len(c.get_metric_history(benign.info.run_id, "loss")) == 100
    assert [a.path for a in c.list_artifacts(benign.info.run_id, "exports/00000/00")] == ["exports/00000/00/input.png"]
    assert [a.path for a in c.list_artifacts(benign.info.run_id, "metrics")] == ["metrics/accuracy.txt"]


class _Scalar:
    """Stands in for a 0-d tensor (what `.item()` reads)."""

    def __init__(self, value):
        self.value = value

    def item(self):
        return self.value


def test_track_metrics_logs_to_the_active_chain(daemon):
    evaluation = Evaluation("track-metrics")
    with evaluation.add_chain("benign") as chain:
        pass
    with pytest.raises(RuntimeError, match="active chain"):
        armory_track.track_metrics({"acc": 1.0})
    with evaluation.run():
        with chain.run():
            armory_track.track_metrics({"acc": 0.9, "per_class": [0.25, 0.5, _Scalar(0.75)], "loss": _Scalar(2.5)}, step=3)
            with armory_track.track_system_metrics(chain.run_id):  # a no-op, kept for compatibility
                pass
    evaluation.wait_uploaded(30)
    client = MlflowClient(tracking_uri="file://" + str(daemon.store))
    assert [(m.step, m.value) for m in client.get_metric_history(chain.run_id, "acc")] == [(3, 0.9)]
    assert sorted((m.step, m.value) for m in client.get_metric_history(chain.run_id, "per_class")) == [(0, 0.25), (1, 0.5), (2, 0.75)]
    assert [(m.step, m.value) for m in client.get_metric_history(chain.run_id, "loss")] == [(3, 2.5)]
    assert not client.get_metric_history(evaluation.run_id, "acc")
