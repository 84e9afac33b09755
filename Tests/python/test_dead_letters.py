"""What a server refuses for good is not lost (issue 23): a refused batch is split until only the
refused entities are left, those go to the destination's dead-letter file, their client is told,
`armoryctl errors` lists them and `armoryctl errors --retry` sends them again once the cause is
fixed. Against the real `mlflow server`; a proxy refuses what MLflow would refuse only sometimes."""
import json
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, Daemon, RawClient, start_chain, wait_for
from faultproxy import FaultProxy

BASE_TS = 1795500000000


def armoryctl(daemon, *args):
    return subprocess.run([str(BIN / "armoryctl"), *args], env=daemon.env(), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def dead_letters(daemon, *args):
    out = armoryctl(daemon, "errors", "--json", *args)
    return json.loads(out.stdout)


@pytest.fixture
def proxied(tmp_path, mlflow_server):
    proxy = FaultProxy(mlflow_server.port)
    d = Daemon(tmp_path / "daemon", env={"MLFLOW_TRACKING_URI": proxy.url}, args=("--flush-interval", "0.2", "--request-timeout", "5"))
    yield proxy, d
    d.stop()
    proxy.close()


def test_a_refused_key_in_1000_metric_batches_is_a_dead_letter_and_every_other_point_lands(proxied, mlflow_server):
    proxy, daemon = proxied
    proxy.refused_keys = {"bad key"}
    c = RawClient(daemon.socket)
    c.hello()
    run = start_chain(c, "refused-key", evaluation="dead-letters")
    for frame in range(30):  # 3 keys × 100 points per frame; the uploader merges them into 1000-metric batches
        c.send("log", run=run["handle"], metrics=[[key, float(k), frame * 100 + k, BASE_TS + frame * 100 + k]
                                                  for k in range(100) for key in ("acc", "bad key", "loss")])
    assert c.request("flush", wait="uploaded", timeout_ms=60000)["complete"]
    run_id = c.request("run_info", run=run["handle"], wait_ms=10000)["run_id"]
    client = MlflowClient(tracking_uri=mlflow_server.url)
    for key in ("acc", "loss"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(3000))
    assert client.get_metric_history(run_id, "bad key") == []
    assert proxy.metrics_forwarded == 6000  # every good point once

    listed = dead_letters(daemon)
    points = [row for line in listed["dead_letters"] for row in line["record"]["metrics"]]
    assert sorted(p[2] for p in points) == list(range(3000)) and {p[0] for p in points} == {"bad key"}
    assert {(line["run_id"], line["http_status"], line["error_code"]) for line in listed["dead_letters"]} == {(run_id, 400, "INVALID_PARAMETER_VALUE")}
    assert all("Invalid metric name: 'bad key'" in line["message"] for line in listed["dead_letters"])
    # The split found the key from MLflow's message: two calls per merged batch, not a bisection.
    assert proxy.refusals_served == len(listed["dead_letters"])
    # The client was told, naming the key and where the records are kept.
    assert wait_for(lambda: c.errors)
    assert c.errors[0]["code"] == "SINK_REJECTED" and c.errors[0]["key"] == "bad key" and c.errors[0]["failed_op"] == "log"
    assert "armoryctl errors" in c.errors[0]["message"]
    status = daemon.status()
    assert status["dead_letters"] == len(listed["dead_letters"]) and status["destinations"][0]["dead_letters"] == status["dead_letters"]
    text = armoryctl(daemon, "errors")
    assert text.returncode == 1 and "bad key" in text.stdout and "--retry" in text.stdout
    assert armoryctl(daemon, "runs", "--errors").stdout == text.stdout  # its other name

    # The server's rule changes (here: the proxy's); --retry sends them again and they land.
    proxy.refused_keys = set()
    retried = json.loads(armoryctl(daemon, "errors", "--retry", "--json").stdout)
    assert retried["requeued"] == len(listed["dead_letters"])
    assert armoryctl(daemon, "flush", "--wait", "--timeout", "60").returncode == 0
    assert sorted(m.step for m in client.get_metric_history(run_id, "bad key")) == list(range(3000))
    assert wait_for(lambda: dead_letters(daemon)["dead_letters"] == [])
    c.request("end", chain=2)
    c.close()


def test_an_html_4xx_is_a_dead_letter_with_the_start_of_its_body(proxied, mlflow_server):
    proxy, daemon = proxied
    c = RawClient(daemon.socket)
    c.hello()
    run = start_chain(c, "html-400", evaluation="dead-letters")
    assert c.request("flush", wait="uploaded", timeout_ms=30000)["complete"]
    proxy.faults = [("log-batch", ("html", 400, None))]
    c.send("log", run=run["handle"], params={"lr": "0.1"})
    assert c.request("flush", wait="uploaded", timeout_ms=30000)["complete"]
    [line] = dead_letters(daemon)["dead_letters"]
    assert line["http_status"] == 400 and line["error_code"] is None
    assert "<html><body><h1>400" in line["message"] and line["record"]["params"] == {"lr": "0.1"}
    c.send("log", run=run["handle"], metrics=[["after", 1.0, 0, BASE_TS]])  # the run goes on
    assert c.request("flush", wait="uploaded", timeout_ms=30000)["complete"]
    run_id = c.request("run_info", run=run["handle"])["run_id"]
    assert MlflowClient(tracking_uri=mlflow_server.url).get_run(run_id).data.metrics == {"after": 1.0}
    c.close()


def test_records_for_a_deleted_experiment_wait_as_dead_letters_until_it_is_restored(tmp_path, mlflow_server):
    """The lab's MLflow refuses writes to runs of a deleted experiment; after `restore`, --retry lands them."""
    daemon = Daemon(tmp_path / "daemon", env={"MLFLOW_TRACKING_URI": mlflow_server.url}, args=("--flush-interval", "0.1"))
    try:
        client = MlflowClient(tracking_uri=mlflow_server.url)
        c = RawClient(daemon.socket)
        c.hello()
        run = start_chain(c, "deleted", evaluation="dead-letters-deleted")
        c.send("log", run=run["handle"], metrics=[["loss", 1.0, 0, BASE_TS]])
        assert c.request("flush", wait="uploaded", timeout_ms=30000)["complete"]
        run_id = c.request("run_info", run=run["handle"])["run_id"]
        experiment_id = client.get_run(run_id).info.experiment_id
        client.delete_experiment(experiment_id)
        c.send("log", run=run["handle"], metrics=[["loss", float(step), step, BASE_TS + step] for step in range(1, 500)], params={"lr": "0.1"})
        c.request("end", chain=2)
        assert c.request("flush", wait="uploaded", timeout_ms=30000)["complete"]
        listed = dead_letters(daemon, "--run", run_id)["dead_letters"]
        assert [line["record"]["kind"] for line in listed] == ["log", "update_run"]  # a refused run is not bisected
        assert all(line["run_id"] == run_id and line["http_status"] == 400 for line in listed)
        assert dead_letters(daemon, "--run", "0" * 32)["dead_letters"] == []
        assert wait_for(lambda: any(e["code"] == "SINK_REJECTED" for e in c.errors))

        client.restore_experiment(experiment_id)
        assert json.loads(armoryctl(daemon, "errors", "--retry", "--run", run_id, "--json").stdout)["requeued"] == 2
        assert armoryctl(daemon, "flush", "--wait", "--timeout", "60").returncode == 0
        got = client.get_run(run_id)
        assert got.info.status == "FINISHED" and got.data.params == {"lr": "0.1"}
        assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(500))
        assert wait_for(lambda: dead_letters(daemon)["dead_letters"] == [])
        c.close()
    finally:
        daemon.stop()
