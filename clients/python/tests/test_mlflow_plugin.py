"""Unchanged MLflow code with MLFLOW_TRACKING_URI=armoryd://, each script in a fresh process,
read back with MLflow's own client on the daemon's store."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN


def run_mlflow(script: str, env_extra=None, expect_ok=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"MLFLOW_TRACKING_URI": "armoryd://", "MLFLOW_ALLOW_FILE_STORE": "true"}, **(env_extra or {}))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=120)
    if expect_ok:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def store(daemon):
    """The daemon's store, once it holds everything the daemon was given (a process's `end_run`
    waits for its records to be durable, not written to the store)."""
    out = subprocess.run([str(BIN / "armoryctl"), "flush", "--wait", "--timeout", "120"], env=dict(os.environ, ARMORY_SOCKET=daemon.socket),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    return MlflowClient(tracking_uri="file://" + str(daemon.store))


def test_the_seeds_flow_through_the_fluent_api(daemon, tmp_path):
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "a.txt").write_text("A")
    (tmp_path / "art" / "sub").mkdir()
    (tmp_path / "art" / "sub" / "b.txt").write_text("B")
    out = run_mlflow(f"""
        import mlflow
        mlflow.set_experiment("fluent")
        mlflow.set_experiment_tag("owner", "lab")
        with mlflow.start_run(run_name="parent", description="about") as parent:
            mlflow.log_param("lr", 0.1)
            mlflow.log_params({{"depth": 3, "opt": "sgd"}})
            mlflow.set_tag("team", "red")
            mlflow.set_tags({{"a": "1", "draft": "yes"}})
            mlflow.delete_tag("draft")
            try:
                mlflow.delete_tag("never-set")
            except mlflow.exceptions.MlflowException as e:
                print("missing-tag:", "No tag with name: never-set" in str(e), file=__import__("sys").stderr)
            with mlflow.start_run(run_name="child", nested=True) as child:
                mlflow.log_metric("loss", 0.5, step=1)
                mlflow.log_metrics({{"acc": 0.9, "nan": float("nan"), "inf": float("inf")}}, step=2)
                for i in range(20):
                    mlflow.log_metric("async", i, step=i, synchronous=False)
                mlflow.log_dict({{"value": 0.9}}, "metrics/accuracy.json")
                mlflow.log_text("hi", "notes.txt")
                mlflow.log_artifact("{tmp_path}/art/a.txt")
                mlflow.log_artifacts("{tmp_path}/art", "exports")
        with mlflow.start_run(run_id=child.info.run_id):
            mlflow.log_metric("custom_metric", 42)
        print(parent.info.run_id, child.info.run_id)
    """)
    parent_id, child_id = out.stdout.split()
    c = store(daemon)
    parent, child = c.get_run(parent_id), c.get_run(child_id)
    assert parent.info.run_name == "parent" and parent.info.status == "FINISHED"
    assert parent.data.params == {"lr": "0.1", "depth": "3", "opt": "sgd"}
    assert parent.data.tags["team"] == "red" and parent.data.tags["mlflow.note.content"] == "about"
    assert "draft" not in parent.data.tags and "missing-tag: True" in out.stderr
    assert c.get_experiment(parent.info.experiment_id).tags["owner"] == "lab"
    assert child.data.tags["mlflow.parentRunId"] == parent_id and child.info.run_name == "child"
    assert child.data.metrics["loss"] == 0.5 and child.data.metrics["custom_metric"] == 42
    assert math.isnan(child.data.metrics["nan"]) and child.data.metrics["inf"] == math.inf
    # MLflow's own async queue sends batches from a thread pool: complete, not necessarily in order.
    assert sorted(m.step for m in c.get_metric_history(child_id, "async")) == list(range(20))
    assert child.info.status == "FINISHED"
    paths = {a.path for a in c.list_artifacts(child_id)}
    assert paths == {"metrics", "notes.txt", "a.txt", "exports"}
    assert {a.path for a in c.list_artifacts(child_id, "exports")} == {"exports/a.txt", "exports/sub"}
    assert json.load(open(c.download_artifacts(child_id, "metrics/accuracy.json", str(tmp_path)))) == {"value": 0.9}
    assert open(c.download_artifacts(child_id, "exports/sub/b.txt", str(tmp_path))).read() == "B"


def test_mlflow_client_and_log_batch_at_the_limits(daemon):
    out = run_mlflow("""
        import time
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag
        c = MlflowClient()
        exp = c.create_experiment("client-api")
        run = c.create_run(exp, run_name="limits")
        now = int(time.time() * 1000)
        c.log_batch(run.info.run_id,
                    metrics=[Metric("m", float(i), now, i) for i in range(900)],
                    params=[Param(f"p{i}", str(i)) for i in range(50)],
                    tags=[RunTag(f"t{i}", str(i)) for i in range(50)])
        c.log_metric(run.info.run_id, "single", 1.5)
        c.set_terminated(run.info.run_id, "KILLED")
        assert c.get_run(run.info.run_id).info.status == "KILLED"
        assert len(c.get_metric_history(run.info.run_id, "m")) == 900
        print(run.info.run_id)
    """)
    run = store(daemon).get_run(out.stdout.strip())
    assert len(run.data.params) == 50 and run.data.tags["t49"] == "49" and run.info.status == "KILLED"


def test_models_and_the_registry_on_the_daemons_local_store(daemon):
    out = run_mlflow("""
        import mlflow, numpy as np
        from sklearn.linear_model import LinearRegression
        mlflow.set_experiment("models-local")
        X = np.array([[1.0], [2.0]])
        with mlflow.start_run() as run:
            info = mlflow.sklearn.log_model(LinearRegression().fit(X, 3 * X[:, 0]), name="model")
            mlflow.log_param("long", "v" * 7000)  # truncated to 6000, as MLflow does
        print(mlflow.MlflowClient().get_logged_model(info.model_id).status)
        print(mlflow.pyfunc.load_model(info.model_uri).predict(X).round(3).tolist())
        print(mlflow.register_model(info.model_uri, "local-registered").version)
        print(mlflow.sklearn.load_model("models:/local-registered/1").predict(X[:1]).round(3).tolist())
        print(run.info.run_id)
    """)
    lines = out.stdout.split("\n")
    assert lines[:4] == ["READY", "[3.0, 6.0]", "1", "[3.0]"], out.stdout + out.stderr[-2000:]
    renamed = run_mlflow(f"""
        import mlflow
        mlflow.MlflowClient().update_run("{lines[4]}", name="renamed")
    """)
    assert renamed.returncode == 0
    run = store(daemon).get_run(lines[4])
    assert run.info.run_name == "renamed" and run.data.tags["mlflow.runName"] == "renamed"
    assert store(daemon).get_run(lines[4]).data.params["long"] == "v" * 6000
    assert (daemon.store / "models" / "local-registered").is_dir()  # MLflow's file registry, beside the store


def test_an_invalid_key_and_a_changed_param_fail_at_the_call(daemon):
    out = run_mlflow("""
        import mlflow
        from mlflow.exceptions import MlflowException
        mlflow.set_experiment("errors")
        try:
            with mlflow.start_run():
                mlflow.log_metric("bad//key", 1)
        except MlflowException as e:
            print("invalid-key:", "bad//key" in str(e))
        with mlflow.start_run() as run:
            mlflow.log_param("lr", 0.1)
            try:
                mlflow.log_param("lr", 0.2)  # raises at this line, as MLflow does
            except MlflowException as e:
                print("changed:", "Changing param values is not allowed" in str(e) and "key='lr'" in str(e))
        print("ended:", mlflow.get_run(run.info.run_id).info.status)
    """)
    assert "invalid-key: True" in out.stdout and "changed: True" in out.stdout and "ended: FINISHED" in out.stdout


def test_the_plugins_per_key_cache_stays_bounded_and_every_point_lands(daemon):
    out = run_mlflow("""
        import mlflow
        from armory_track import mlflow_plugin
        mlflow.set_experiment("many-keys")
        with mlflow.start_run() as run:
            for i in range(5000):
                mlflow.log_metric(f"k{i}", i)
            mlflow.log_metric("k0", -1, step=1)  # a key whose cached parts were dropped
            print("cached:", len(mlflow_plugin._metric_heads), "bound:", mlflow_plugin._MAX_METRIC_HEADS)
        print("run:", run.info.run_id)
    """)
    cached, bound = (int(x) for x in out.stdout.split("cached: ")[1].split("\n")[0].split(" bound: "))
    assert cached <= bound < 5000
    run = store(daemon).get_run(out.stdout.split("run: ")[1].strip())
    assert len(run.data.metrics) == 5000 and run.data.metrics["k4999"] == 4999
    assert [m.value for m in store(daemon).get_metric_history(run.info.run_id, "k0")] == [0, -1]


def test_no_daemon_is_a_clear_error(tmp_path):
    out = run_mlflow("""
        import mlflow
        mlflow.set_experiment("nobody")
    """, env_extra={"ARMORY_SOCKET": str(tmp_path / "none.sock")}, expect_ok=False)
    assert out.returncode != 0 and "No armoryd is listening" in out.stderr and "armoryd &" in out.stderr


def test_importing_mlflow_with_the_plugin_installed_is_harmless():
    out = subprocess.run([sys.executable, "-c", "import mlflow; from mlflow import MlflowClient; MlflowClient('armoryd://'); print('ok')"],
                         capture_output=True, text=True, env={**os.environ, "ARMORY_SOCKET": "/nonexistent.sock"})
    assert out.stdout.strip() == "ok", out.stderr  # built during import: it connects lazily


def test_system_metrics_monitor_on_a_plugin_run(daemon):
    pytest.importorskip("psutil", reason="MLflow's SystemMetricsMonitor needs psutil")
    out = run_mlflow("""
        import time, mlflow
        mlflow.set_experiment("sysmetrics")
        with mlflow.start_run(log_system_metrics=True) as run:
            time.sleep(12)
        print(run.info.run_id)
    """, env_extra={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1"})
    metrics = store(daemon).get_run(out.stdout.strip()).data.metrics
    assert any(k.startswith("system/") for k in metrics), metrics


def test_the_resume_example(daemon):
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "mlflow_resume.py")
    out = run_mlflow(open(example).read().replace('if __name__ == "__main__":', "if True:"))
    run_id = out.stdout.split()[2].rstrip(":")
    c = store(daemon)
    assert c.get_run(run_id).data.metrics == {"accuracy": 0.91, "custom_metric": 42.0}
    assert [a.path for a in c.list_artifacts(run_id)] == ["report.txt"]
    assert c.get_run(run_id).info.status == "FINISHED"


# A small Lightning model and its data, the same in every run (seeded).
LIGHTNING_REGRESSION = """
import torch, lightning as L

class Regression(L.LightningModule):
    def __init__(self, lr=0.1, hidden=4):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

torch.manual_seed(0)
x = torch.randn(64, 3)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
"""


def test_lightning_mlflow_logger_unmodified(daemon):
    """What Armory's engine uses: Lightning's MLFlowLogger, unmodified, through armoryd://.
    Needs torch and lightning: `make test-compat` (skipped in `make test`)."""
    pytest.importorskip("lightning", reason="run by `make test-compat`")
    out = run_mlflow(LIGHTNING_REGRESSION + """
from lightning.pytorch.loggers import MLFlowLogger
logger = MLFlowLogger(experiment_name="lightning", tracking_uri="armoryd://", run_name="fit")
trainer = L.Trainer(max_epochs=3, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, log_every_n_steps=1, accelerator="cpu")
trainer.fit(Regression(), data)
print(logger.run_id)
""")
    run_id = out.stdout.strip().splitlines()[-1]
    c = store(daemon)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "fit"
    assert run.data.params["lr"] == "0.1" and run.data.params["hidden"] == "4"
    assert len(c.get_metric_history(run_id, "train_loss_step")) == 24  # 3 epochs × 8 steps
    assert len(c.get_metric_history(run_id, "epoch")) > 0


AUTOLOG_SCRIPT = LIGHTNING_REGRESSION + """
import mlflow
mlflow.set_experiment("autolog")
mlflow.pytorch.autolog()
trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu")
with mlflow.start_run(run_name="autolog") as run:
    trainer.fit(Regression(), data)
print(run.info.run_id)
"""


def autologged(client, run_id):
    """What an autologged run holds, without what differs between any two runs (ids, times, paths)."""
    run = client.get_run(run_id)

    def files(path=None):
        for a in client.list_artifacts(run_id, path):
            yield from files(a.path) if a.is_dir else [a.path]

    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    varying = ("mlflow.source.", "mlflow.user", "mlflow.log-model.history", "armory.")
    return {
        "status": run.info.status, "name": run.info.run_name, "params": run.data.params,
        "tags": {k: v for k, v in run.data.tags.items() if not k.startswith(varying)},
        "history": {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in run.data.metrics},
        "files": sorted(files()),
        "models": sorted((m.name, str(m.status), sorted(m.params.items())) for m in models),
        "model files": sorted(p for m in models for p in (a.path for a in client.list_logged_model_artifacts(m.model_id))),
    }


def test_lightning_autologging_through_armoryd_as_directly(daemon, tmp_path, monkeypatch):
    """`mlflow.pytorch.autolog()` around a Lightning Trainer, unchanged: the run, its metrics, its
    params and its logged model are the same through armoryd:// as written directly.
    Needs torch and lightning: `make test-compat` (skipped in `make test`)."""
    pytest.importorskip("lightning", reason="run by `make test-compat`")
    direct_store = "file://" + str(tmp_path / "direct")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # whatever Lightning writes beside the script
    direct = run_mlflow(AUTOLOG_SCRIPT, {"MLFLOW_TRACKING_URI": direct_store}).stdout.strip().splitlines()[-1]
    through = run_mlflow(AUTOLOG_SCRIPT).stdout.strip().splitlines()[-1]
    a = autologged(MlflowClient(tracking_uri=direct_store), direct)
    b = autologged(store(daemon), through)
    assert a["status"] == "FINISHED" and a["history"] and a["models"] and a["model files"]
    assert b == a


def test_writes_resume_after_the_daemon_restarts(daemon, tmp_path):
    """Daemon killed (SIGKILL) mid-run: while it is down, calls return at once (the session keeps
    them); once restarted, its journal is replayed, the process's session is resumed, and what it
    logged before, during and after the outage lands on the same run."""
    script = tmp_path / "resume.py"
    marker = tmp_path / "killed"
    script.write_text(textwrap.dedent(f"""
        import os, time, mlflow
        mlflow.set_experiment("restart")
        run = mlflow.start_run()
        mlflow.log_metric("before", 1.0)
        mlflow.flush_async_logging()  # a durable sync point: acknowledged, nothing more
        print(run.info.run_id, flush=True)
        while not os.path.exists("{marker}"):
            time.sleep(0.05)
        started = time.monotonic()
        mlflow.log_metric("during", 1.0)
        print("returned while down:", time.monotonic() - started < 1.0, flush=True)
        open("{marker}.ack", "w").close()
        while not os.path.exists("{marker}.up"):
            time.sleep(0.05)
        mlflow.log_metric("after", 2.0)
        mlflow.end_run()
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI="armoryd://", MLFLOW_ALLOW_FILE_STORE="true")
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    daemon.proc.kill()
    daemon.proc.wait()
    os.unlink(daemon.socket) if os.path.exists(daemon.socket) else None
    marker.touch()
    import time

    deadline = time.time() + 30
    while not os.path.exists(str(marker) + ".ack"):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    restarted = subprocess.Popen([str(BIN / "armoryd"), "--socket", daemon.socket, "--home", str(daemon.home)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not os.path.exists(daemon.socket):
            time.sleep(0.05)
        open(str(marker) + ".up", "w").close()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert "returned while down: True" in out
        c = MlflowClient(tracking_uri="file://" + str(daemon.store))
        deadline = time.time() + 10
        while c.get_run(run_id).info.status != "FINISHED" and time.time() < deadline:
            time.sleep(0.1)
        run = c.get_run(run_id)
        assert run.data.metrics == {"before": 1.0, "during": 1.0, "after": 2.0} and run.info.status == "FINISHED"
    finally:
        restarted.terminate()
        restarted.wait()
        daemon.proc = restarted


def test_a_model_logged_across_a_daemon_kill_is_ready_and_loads(daemon, tmp_path):
    """`kill -9` of the daemon between `log_model`'s files and its finalization: the model reaches
    READY and loads, and the run's own records (before, during and after) land once it is back."""
    marker = tmp_path / "files-written"
    script = tmp_path / "model.py"
    script.write_text(textwrap.dedent(f"""
        import os, time, mlflow, numpy as np
        from sklearn.linear_model import LinearRegression
        finalize = mlflow.MlflowClient.finalize_logged_model
        def after_the_restart(self, *args, **kwargs):  # the files are written; the daemon is killed now
            open("{marker}", "w").close()
            while not os.path.exists("{marker}.up"):
                time.sleep(0.05)
            return finalize(self, *args, **kwargs)
        mlflow.MlflowClient.finalize_logged_model = after_the_restart
        mlflow.set_experiment("killed-model")
        X = np.array([[1.0], [2.0], [3.0]])
        with mlflow.start_run() as run:
            mlflow.log_param("alpha", 1)
            info = mlflow.sklearn.log_model(LinearRegression().fit(X, 2 * X[:, 0]), name="model")
            mlflow.log_metric("after", 2.0)
        print(run.info.run_id, info.model_id, flush=True)
        print("loaded", mlflow.pyfunc.load_model(info.model_uri).predict(X).round(3).tolist(), flush=True)
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI="armoryd://", MLFLOW_ALLOW_FILE_STORE="true")
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time

    deadline = time.time() + 120
    while not marker.exists():
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    daemon.kill()
    daemon.start()
    open(str(marker) + ".up", "w").close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    run_id, model_id = out.splitlines()[0].split()
    assert out.splitlines()[1] == "loaded [2.0, 4.0, 6.0]"
    c = store(daemon)
    assert str(c.get_logged_model(model_id).status) == "READY"
    assert "MLmodel" in {a.path for a in c.list_logged_model_artifacts(model_id)}  # and it loaded, above
    deadline = time.time() + 30
    while c.get_run(run_id).info.status != "FINISHED" and time.time() < deadline:
        time.sleep(0.1)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"alpha": "1"} and run.data.metrics == {"after": 2.0}


def test_a_process_on_armoryd_can_name_its_own_destination(daemon, tmp_path):
    other = tmp_path / "own-store"
    out = run_mlflow("""
        import mlflow
        mlflow.set_experiment("own-destination")
        with mlflow.start_run() as run:
            mlflow.log_metric("m", 1.0)
        print(run.info.run_id)
    """, env_extra={"ARMORY_TRACKING_URI": "file://" + str(other)})
    run_id = out.stdout.strip()
    assert MlflowClient(tracking_uri="file://" + str(other)).get_run(run_id).data.metrics == {"m": 1.0}
    assert not list(daemon.store.rglob(run_id))
