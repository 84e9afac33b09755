"""armoryd uploading to a real `mlflow server` (SQLite, proxied artifacts), read back with the
real MLflow client; faults MLflow can't produce on demand come from a proxy in front of it."""
import math
import os
import subprocess
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import AUTH_PASSWORD, BIN, Daemon, RawClient, start_chain
from examplecheck import assert_example_recorded, run_example
from faultproxy import FaultProxy

BASE_TS = 1795400000000


@pytest.fixture
def rest_daemon(tmp_path, mlflow_server):
    d = Daemon(tmp_path / "daemon", env={"MLFLOW_TRACKING_URI": mlflow_server.url}, args=("--flush-interval", "0.2"))
    yield d
    d.stop()


def test_example_lands_completely(rest_daemon, mlflow_server, tmp_path):
    parent, chains = run_example(rest_daemon, env={"ARMORY_WAIT_UPLOAD": "60"})
    assert_example_recorded(MlflowClient(tracking_uri=mlflow_server.url), parent, chains, tmp_path)
    status = rest_daemon.status()
    assert status["destination"].startswith(mlflow_server.url) and status["state"] == "running"


def test_sixteen_clients_twenty_thousand_metrics_each_land_exactly_once(rest_daemon, mlflow_server):
    run_ids = {}
    failures = []

    def client_main(i):
        try:
            c = RawClient(rest_daemon.socket)
            c.hello()
            run = start_chain(c, f"client-{i:02d}", evaluation="rest-concurrency")
            for frame in range(200):
                metrics = [["m", float(i), frame * 100 + k, BASE_TS + frame * 100 + k] for k in range(100)]
                c.send("log", run=run["handle"], metrics=metrics)
            reply = c.request("flush", wait="uploaded", timeout_ms=240000)
            assert reply["complete"], reply
            info = c.request("run_info", run=run["handle"], wait_ms=10000)
            run_ids[i] = info["run_id"]
            c.request("end", chain=2, status="FINISHED")
            assert not c.errors, c.errors
            c.close()
        except Exception as e:  # surfaced below
            failures.append(repr(e))

    threads = [threading.Thread(target=client_main, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures
    client = MlflowClient(tracking_uri=mlflow_server.url)
    for i, run_id in run_ids.items():
        history = client.get_metric_history(run_id, "m")
        assert len(history) == 20000, (i, len(history))
        assert sorted(m.step for m in history) == list(range(20000))
        assert all(m.value == float(i) for m in history)
    assert len(run_ids) == 16
    # Daemon side: every metric sent once (MLflow would hide exact duplicates).
    assert rest_daemon.status()["metrics_written"] == 16 * 20000


def test_limits_in_one_burst(rest_daemon, mlflow_server):
    c = RawClient(rest_daemon.socket)
    c.hello()
    run = start_chain(c, "limits", evaluation="rest-limits")
    params = {f"p{i:03d}": f"v{i}" for i in range(249)}
    params["long"] = "x" * 6000
    tags = {f"t{i:03d}": f"w{i}" for i in range(350)}
    metrics = [["m", float(k), k, BASE_TS + k] for k in range(4997)]
    metrics += [["special", "NaN", 0, BASE_TS], ["special", "Infinity", 1, BASE_TS], ["special", "-Infinity", 2, BASE_TS]]
    c.send("log", run=run["handle"], params=params, tags=tags, metrics=metrics)
    assert c.request("flush", wait="uploaded", timeout_ms=60000)["complete"]
    assert not c.errors, c.errors
    run_id = c.request("run_info", run=run["handle"])["run_id"]
    got = MlflowClient(tracking_uri=mlflow_server.url).get_run(run_id)
    assert len(got.data.params) == 250 and got.data.params["long"] == "x" * 6000
    assert all(got.data.tags[k] == v for k, v in tags.items())
    client = MlflowClient(tracking_uri=mlflow_server.url)
    assert len(client.get_metric_history(run_id, "m")) == 4997
    special = {m.step: m.value for m in client.get_metric_history(run_id, "special")}
    assert math.isnan(special[0])
    assert special[1] == 1.7976931348623157e308 and special[2] == -1.7976931348623157e308  # SQL stores keep ±Inf as ±max double
    c.close()


def test_changed_param_is_reported_and_the_rest_lands(rest_daemon, mlflow_server):
    c = RawClient(rest_daemon.socket)
    c.hello()
    run = start_chain(c, "changed", evaluation="rest-changed")
    c.send("log", run=run["handle"], params={"lr": "0.1"})
    seq = c.send("log", run=run["handle"], params={"lr": "0.2", "other": "x"}, metrics=[["loss", 1.0, 0, BASE_TS]])
    c.request("flush", wait="uploaded", timeout_ms=30000)
    assert [(e["code"], e["seq"]) for e in c.errors] == [("PARAM_CHANGED", seq)]
    assert "'lr'" in c.errors[0]["message"]
    got = MlflowClient(tracking_uri=mlflow_server.url).get_run(c.request("run_info", run=run["handle"])["run_id"])
    assert got.data.params == {"lr": "0.1", "other": "x"}
    assert got.data.metrics == {"loss": 1.0}
    c.close()


def test_basic_auth_right_credentials_land_wrong_ones_are_clear_errors(tmp_path, mlflow_auth_server):
    password, server = AUTH_PASSWORD, mlflow_auth_server
    good = Daemon(tmp_path / "good", env={"MLFLOW_TRACKING_URI": server.url, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password})
    parent, chains = run_example(good, env={"ARMORY_WAIT_UPLOAD": "60"})
    assert password not in good.status()["destination"]
    good.stop()
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "admin", password
    try:
        assert_example_recorded(MlflowClient(tracking_uri=server.url), parent, chains, tmp_path)
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]

    bad = Daemon(tmp_path / "bad", env={"MLFLOW_TRACKING_URI": server.url, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong"})
    # Refused credentials are not a reason to drop records: they wait. An evaluation that waits
    # for uploads is told at once what to do; one that waits for durability is warned and goes on.
    out = subprocess.run([str(BIN / "armory-example")], env=dict(bad.env(), ARMORY_WAIT_UPLOAD="60"), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "AUTH_REQUIRED" in out.stderr and "401" in out.stderr and "MLFLOW_TRACKING_USERNAME" in out.stderr
    out = subprocess.run([str(BIN / "armory-example")], env=bad.env(), capture_output=True, text=True, timeout=60)
    assert "armoryd warning" in out.stderr and "401" in out.stderr and "refuses the credentials" in out.stderr  # (it wants run ids to show)
    status = bad.status()
    assert status["state"] == "degraded" and "401" in status["last_error"]
    assert status["destinations"][0]["state"] == "needs-credentials" and status["pending_records"] > 0
    assert "wrong" not in str(status)
    began = time.time()
    assert bad.stop() == 0
    assert time.time() - began < 10  # nothing can land: it does not wait out --shutdown-drain (30 s); the journal keeps it
    log = (tmp_path / "bad" / "armoryd.log").read_text()
    assert "wrong" not in log


@pytest.fixture
def proxied(tmp_path, mlflow_server):
    proxy = FaultProxy(mlflow_server.port)
    d = Daemon(tmp_path / "daemon", env={"MLFLOW_TRACKING_URI": proxy.url},
               args=("--flush-interval", "0.1", "--request-timeout", "2"))
    yield proxy, d
    d.stop()
    proxy.close()


def log_and_check(proxy, daemon, mlflow_server, name, count=1000, flush_timeout_ms=60000):
    c = RawClient(daemon.socket)
    c.hello()
    run = start_chain(c, name, evaluation="rest-faults")
    for frame in range(count // 100):
        c.send("log", run=run["handle"], metrics=[["m", float(k), frame * 100 + k, BASE_TS + frame * 100 + k] for k in range(100)])
    reply = c.request("flush", wait="uploaded", timeout_ms=flush_timeout_ms)
    assert reply["complete"], reply
    run_id = c.request("run_info", run=run["handle"], wait_ms=10000)["run_id"]
    history = MlflowClient(tracking_uri=mlflow_server.url).get_metric_history(run_id, "m")
    assert sorted(m.step for m in history) == list(range(count))
    assert proxy.metrics_forwarded == count  # nothing sent twice
    c.close()
    return run_id


def test_503_with_retry_after_is_honoured(proxied, mlflow_server):
    proxy, daemon = proxied
    proxy.faults = [("log-batch", ("status", 503, 1))] * 3
    started = time.time()
    log_and_check(proxy, daemon, mlflow_server, "retry-after")
    assert proxy.faults_served == 3
    assert time.time() - started >= 3  # three Retry-After: 1


def test_a_proxys_html_5xx_pages_are_retried_and_nothing_is_dropped(proxied, mlflow_server):
    proxy, daemon = proxied
    proxy.faults = [("log-batch", ("html", 502, None))] * 5 + [("log-batch", ("html", 520, None)), ("runs/create", ("html", 504, None))]
    log_and_check(proxy, daemon, mlflow_server, "html-pages")
    assert proxy.faults_served == 7
    assert daemon.status()["rejected_records"] == 0


def test_a_hanging_request_times_out_and_is_retried(proxied, mlflow_server):
    proxy, daemon = proxied
    proxy.faults = [("log-batch", ("hang", 5))]
    log_and_check(proxy, daemon, mlflow_server, "hang")
    assert proxy.faults_served == 1


def test_500_then_success_creates_the_run_once(proxied, mlflow_server):
    proxy, daemon = proxied
    proxy.faults = [("runs/create", ("status", 500, None)), ("log-batch", ("status", 500, None))]
    run_id = log_and_check(proxy, daemon, mlflow_server, "five-hundred")
    handle = MlflowClient(tracking_uri=mlflow_server.url).get_run(run_id).data.tags["armory.handle"]
    experiment = MlflowClient(tracking_uri=mlflow_server.url).get_experiment_by_name("rest-faults")
    same = MlflowClient(tracking_uri=mlflow_server.url).search_runs([experiment.experiment_id], filter_string=f"tags.`armory.handle` = '{handle}'")
    assert len(same) == 1


def test_server_unreachable_for_thirty_seconds_then_everything_lands_once(proxied, mlflow_server):
    proxy, daemon = proxied
    proxy.stop_listening()
    c = RawClient(daemon.socket)
    c.hello()
    began = time.time()
    run = start_chain(c, "outage", evaluation="rest-faults")
    assert time.time() - began < 5  # offline first: a start answers at once
    assert run["run_id"] is None and run["handle"]
    for frame in range(5):
        c.send("log", run=run["handle"], metrics=[["m", float(k), frame * 100 + k, BASE_TS + frame * 100 + k] for k in range(100)])
    c.request("flush", wait="durable", timeout_ms=5000)
    time.sleep(2)
    status = daemon.status()
    assert status["state"] == "degraded" and status["pending_records"] > 0
    assert status["destinations"][0]["journal_bytes"] > 0  # the backlog is on disk
    time.sleep(28)  # a 30 s outage in all
    proxy.start()
    reply = c.request("flush", wait="uploaded", timeout_ms=90000)
    assert reply["complete"], reply
    run_id = c.request("run_info", run=run["handle"], wait_ms=10000)["run_id"]
    history = MlflowClient(tracking_uri=mlflow_server.url).get_metric_history(run_id, "m")
    assert sorted(m.step for m in history) == list(range(500))
    assert proxy.metrics_forwarded == 500
    c.close()


def test_an_evaluation_brings_its_own_destination(daemon, mlflow_server, tmp_path):
    """A daemon on the local store; an evaluation whose process names a server lands there."""
    parent, chains = run_example(daemon, env={"MLFLOW_TRACKING_URI": mlflow_server.url, "ARMORY_WAIT_UPLOAD": "60"})
    assert_example_recorded(MlflowClient(tracking_uri=mlflow_server.url), parent, chains, tmp_path)
    assert not list(daemon.store.rglob(parent))
    status = daemon.status()
    assert [d["destination"].split(" ")[0] for d in status["destinations"]] == [daemon.store_uri, mlflow_server.url]
    # Another process without a tracking URI still writes the daemon's own store.
    local_parent, _ = run_example(daemon, env={"MLFLOW_TRACKING_URI": ""})
    assert list(daemon.store.rglob(local_parent))


COMPARED_SCRIPT = """
import os, mlflow
mlflow.set_experiment(os.environ["EXPERIMENT"])
mlflow.set_experiment_tag("owner", "lab")
with mlflow.start_run(run_name="parent") as parent:
    mlflow.log_params({"lr": 0.1, "depth": 3})
    mlflow.set_tags({"team": "red", "draft": "yes"})
    mlflow.delete_tag("draft")
    for i in range(50):
        mlflow.log_metric("loss", 1.0 / (i + 1), step=i, timestamp=1795400000000 + i)
    with mlflow.start_run(run_name="child", nested=True):
        mlflow.log_metrics({"acc": 0.5, "nan": float("nan")}, step=1, timestamp=1795400000000)
        mlflow.log_dict({"v": 1}, "d.json")
        mlflow.log_text("hi", "notes/n.txt")
        # Reads of the run's artifacts, and log_table, which reads before it writes.
        run_id = mlflow.active_run().info.run_id
        mlflow.log_table({"a": [1, 2]}, "t.json")
        mlflow.log_table({"a": [3]}, "t.json")
        print("listed", sorted(a.path for a in mlflow.artifacts.list_artifacts(run_id=run_id)))
        print("loaded", mlflow.artifacts.load_text(f"runs:/{run_id}/notes/n.txt"), mlflow.artifacts.load_dict(f"runs:/{run_id}/d.json"))
        print("table", len(mlflow.load_table("t.json", run_ids=[run_id])))
mlflow.MlflowClient().update_run(parent.info.run_id, name="parent-renamed")  # reaches the server
with mlflow.start_run(run_name="changed") as run:
    import pandas
    print("inputs", len(mlflow.get_run(run.info.run_id).inputs.dataset_inputs))
    mlflow.log_input(mlflow.data.from_pandas(pandas.DataFrame({"x": [1, 2]}), name="frame"), context="training")
    print("inputs", [d.dataset.name for d in mlflow.get_run(run.info.run_id).inputs.dataset_inputs])  # on a live run
    mlflow.log_param("lr", 0.1)
    try:
        mlflow.log_param("lr", 0.2)  # raises at the call, the exception MLflow raises
    except Exception as e:
        print("raised", type(e).__name__, e.error_code)


@mlflow.trace
def doubled(x):
    return 2 * x


doubled(21)
mlflow.flush_trace_async_logging()
print("traced", [(s.name, s.outputs) for t in mlflow.search_traces(return_type="list") for s in t.data.spans])
"""


def _records(client, experiment, tmp_path):
    exp = client.get_experiment_by_name(experiment)
    out = {"experiment tags": {k: v for k, v in exp.tags.items() if not k.startswith("mlflow.")}}
    for run in client.search_runs([exp.experiment_id]):
        name = run.info.run_name
        parent = run.data.tags.get("mlflow.parentRunId")
        tags = {k: v for k, v in run.data.tags.items() if k not in ("mlflow.parentRunId", "armory.handle")}
        history = {k: [(m.step, m.timestamp, str(m.value)) for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics}
        files = {}
        for directory in ("", "notes"):
            for a in client.list_artifacts(run.info.run_id, directory or None):
                if not a.is_dir:
                    files[a.path] = open(client.download_artifacts(run.info.run_id, a.path, str(tmp_path)), "rb").read()
        out[name] = {"params": run.data.params, "tags": tags, "history": history, "files": files, "status": run.info.status,
                     "has_parent": parent is not None}
    return out


def direct_and_through_armoryd(script, name, tmp_path, mlflow_server):
    """Runs `script` against the server directly (experiment `<name>-direct`), then through
    armoryd:// (`<name>-armoryd`), and waits until the daemon uploaded it all; returns both outputs."""
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    direct = subprocess.run([sys.executable, "-c", script], env={**base, "MLFLOW_TRACKING_URI": mlflow_server.url, "EXPERIMENT": f"{name}-direct"},
                            capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stderr[-2000:]
    daemon = Daemon(tmp_path / "daemon", env={"MLFLOW_TRACKING_URI": mlflow_server.url})
    try:
        through = subprocess.run([sys.executable, "-c", script], env={**base, "MLFLOW_TRACKING_URI": "armoryd://", "ARMORY_SOCKET": daemon.socket,
                                                                     "EXPERIMENT": f"{name}-armoryd"}, capture_output=True, text=True, timeout=300)
        assert through.returncode == 0, through.stderr[-2000:]
        c = RawClient(daemon.socket)
        c.hello()
        c.request("flush", wait="uploaded", timeout_ms=30000)
        c.close()
    finally:
        daemon.stop()
    return direct.stdout, through.stdout


def printed(out, *prefixes):
    """The lines a script printed for comparison (MLflow prints "View run …" links for an http tracking URI only)."""
    return [line for line in out.splitlines() if line.startswith(prefixes)]


def test_the_same_mlflow_script_direct_and_through_armoryd_gives_identical_records(tmp_path, mlflow_server):
    direct, through = direct_and_through_armoryd(COMPARED_SCRIPT, "compare", tmp_path, mlflow_server)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    a, b = _records(client, "compare-direct", tmp_path / "a"), _records(client, "compare-armoryd", tmp_path / "b")
    assert a == b
    shown = ("listed", "loaded", "table", "inputs", "raised", "traced")
    assert printed(direct, *shown) == printed(through, *shown) == [
        "listed ['d.json', 'notes', 't.json']", "loaded hi {'v': 1}", "table 3", "inputs 0", "inputs ['frame']",
        "raised MlflowException INVALID_PARAMETER_VALUE", "traced [('doubled', 42)]"]
    assert set(a) == {"experiment tags", "parent-renamed", "child", "changed"} and a["child"]["has_parent"]
    assert a["experiment tags"] == {"owner": "lab"} and "draft" not in a["parent-renamed"]["tags"]
    assert a["parent-renamed"]["tags"]["mlflow.runName"] == "parent-renamed"


MODEL_SCRIPT = """
import os, mlflow, numpy as np
from sklearn.linear_model import LinearRegression
name = os.environ["EXPERIMENT"]
mlflow.set_experiment(name)
X = np.array([[1.0], [2.0], [3.0]])
with mlflow.start_run() as run:
    info = mlflow.sklearn.log_model(LinearRegression().fit(X, 2 * X[:, 0]), name="model", input_example=X[:1])
client = mlflow.MlflowClient()
print("status", client.get_logged_model(info.model_id).status)
print("models:/", mlflow.pyfunc.load_model(info.model_uri).predict(X).round(3).tolist())
print("runs:/", mlflow.sklearn.load_model(f"runs:/{run.info.run_id}/model").predict(X).round(3).tolist())
version = mlflow.register_model(info.model_uri, name + "-registered")
print("registered", version.version, mlflow.pyfunc.load_model(f"models:/{name}-registered/1").predict(X[:1]).round(3).tolist())
print("searched", [m.name for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])])

# Autologging a grid search: the parent run, a child per candidate, the best estimator's model.
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV
mlflow.sklearn.autolog()
with mlflow.start_run() as searched:
    GridSearchCV(Ridge(), {"alpha": [0.1, 1.0]}, cv=2).fit(np.random.RandomState(0).rand(40, 3), np.arange(40.0))
children = client.search_runs([searched.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{searched.info.run_id}'")
found = client.get_run(searched.info.run_id)
print("autologged", found.info.status, sorted(found.data.metrics), sorted(found.data.params), len(children),
      len(client.search_logged_models(experiment_ids=[searched.info.experiment_id])))
"""


def test_models_autologging_and_the_registry_through_armoryd_as_directly(tmp_path, mlflow_server):
    direct, through = direct_and_through_armoryd(MODEL_SCRIPT, "models", tmp_path, mlflow_server)
    expected = ["status READY", "models:/ [2.0, 4.0, 6.0]", "runs:/ [2.0, 4.0, 6.0]", "registered 1 [2.0]", "searched ['model']"]
    shown = ("status", "models:/", "runs:/", "registered", "searched", "autologged")
    assert printed(direct, *shown)[:5] == expected
    assert printed(through, *shown) == printed(direct, *shown)
    assert printed(through, *shown)[5].startswith("autologged FINISHED [") and printed(through, *shown)[5].endswith(" 2 3")


def test_a_full_journal_slows_writers_down_and_nothing_is_dropped(tmp_path, mlflow_server):
    proxy = FaultProxy(mlflow_server.port)
    daemon = Daemon(tmp_path / "daemon", env={"MLFLOW_TRACKING_URI": proxy.url},
                    args=("--flush-interval", "0.1", "--request-timeout", "2", "--max-backlog-bytes", "2M", "--memory-backlog-bytes", "256K"))
    try:
        proxy.stop_listening()
        c = RawClient(daemon.socket)
        c.hello()
        run = start_chain(c, "full-journal", evaluation="rest-backlog")
        frames = 1000  # ~3.5 MB of journal: more than the bound
        sent = []

        def writer():
            for frame in range(frames):
                c.send("log", run=run["handle"], metrics=[["m", float(k), frame * 100 + k, BASE_TS + frame * 100 + k] for k in range(100)])
                sent.append(frame)

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(8)
        assert t.is_alive() and len(sent) < frames, "the writer was never slowed down"
        stalled_at = len(sent)
        time.sleep(2)
        assert len(sent) - stalled_at < 50  # blocked, not dropped: the daemon stopped reading
        status = daemon.status()
        assert status["state"] == "degraded" and status["pending_records"] > 0
        assert status["destinations"][0]["journal_bytes"] >= 2 << 20
        proxy.start()
        t.join(timeout=120)
        assert not t.is_alive()
        reply = c.request("flush", wait="uploaded", timeout_ms=120000)
        assert reply["complete"], reply
        run_id = c.request("run_info", run=run["handle"], wait_ms=10000)["run_id"]
        history = MlflowClient(tracking_uri=mlflow_server.url).get_metric_history(run_id, "m")
        assert sorted(m.step for m in history) == list(range(frames * 100))
        assert proxy.metrics_forwarded == frames * 100  # nothing sent twice
        assert not c.errors
        c.close()
    finally:
        daemon.stop()
        proxy.close()
