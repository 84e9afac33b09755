"""System metrics sampled once per host by the daemon and logged to every active run under
MLflow's `system/...` names; read back with MLflow's own client."""
import ctypes.util
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import Daemon, RawClient

HOST_METRICS = {
    "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes", "system/system_memory_usage_percentage",
    "system/disk_usage_percentage", "system/disk_usage_megabytes", "system/disk_available_megabytes",
    "system/network_receive_megabytes", "system/network_transmit_megabytes",
}
PROCESS_METRICS = {"system/process_cpu_utilization_percentage", "system/process_memory_rss_megabytes", "system/process_threads"}


def run_chain(d, body, env=None):
    """An armory_track evaluation in a process of its own, `body` inside its chain's run; returns the chain's run id."""
    script = "import time\nfrom armory_track import Evaluation\nevaluation = Evaluation('client')\n" \
             "with evaluation.add_chain('chain') as chain:\n    pass\nwith evaluation.run():\n    with chain.run():\n" \
             + textwrap.indent(body, " " * 8) + "\nprint(chain.run_id)\n"
    out = subprocess.run([sys.executable, "-c", script], env={**d.env(), **(env or {})}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def start(c, name):
    c.send("evaluation", id=1, name=name)
    c.send("chain", id=2, evaluation=1, name="benign")
    parent = c.request("start", evaluation=1)
    return parent, c.request("start", chain=2)


def sampled(d, name, seconds):
    """An evaluation and its chain, active for `seconds` on daemon `d`, then ended."""
    c = RawClient(d.socket)
    c.hello()
    parent, chain = start(c, name)
    time.sleep(seconds)
    c.request("end", evaluation=1, status="FINISHED")
    return c, parent, chain, time.time()


def test_active_runs_get_host_and_process_metrics_at_the_interval_until_they_end(tmp_path):
    d = Daemon(tmp_path / "d", args=("--system-metrics-interval", "0.5"))
    try:
        c, parent, chain, ended = sampled(d, "sysmetrics", 2.8)
        status = d.status()
        assert status["host"]["cpu_utilization_percentage"] >= 0 and status["host"]["system_memory_usage_megabytes"] > 0
        time.sleep(1.5)
        c.request("flush", wait="uploaded", timeout_ms=10000)
        client = MlflowClient(tracking_uri=d.store_uri)
        for run in (parent, chain):
            data = client.get_run(run["run_id"]).data
            assert HOST_METRICS - {"system/cpu_utilization_percentage"} <= set(data.metrics), set(data.metrics)
            assert PROCESS_METRICS - {"system/process_cpu_utilization_percentage"} <= set(data.metrics)
            history = client.get_metric_history(run["run_id"], "system/system_memory_usage_megabytes")
            steps = sorted(m.step for m in history)
            assert steps == list(range(len(steps))) and 4 <= len(steps) <= 7, steps  # one per 0.5 s, counted per run
            times = sorted(m.timestamp for m in history)
            assert all(300 <= b - a <= 1500 for a, b in zip(times, times[1:])), times
            assert max(times) <= ended * 1000 + 200  # none after the run ended
            rss = client.get_metric_history(run["run_id"], "system/process_memory_rss_megabytes")
            assert all(m.value > 1 for m in rss)  # this test process's own RSS
        c.close()
    finally:
        d.stop()


def test_the_process_figures_follow_a_busy_client(tmp_path):
    d = Daemon(tmp_path / "d", args=("--system-metrics-interval", "0.5"))
    try:
        run_id = run_chain(d, "end = time.time() + 3\nwhile time.time() < end:\n    pass")
        client = MlflowClient(tracking_uri=d.store_uri)
        deadline = time.time() + 10
        while not (cpu := client.get_metric_history(run_id, "system/process_cpu_utilization_percentage")):
            assert time.time() < deadline
            time.sleep(0.2)
        assert max(m.value for m in cpu) >= 60, [m.value for m in cpu]  # one core, busy (CI noise allowed for)
    finally:
        d.stop()


def test_a_process_or_a_run_can_opt_out(tmp_path):
    d = Daemon(tmp_path / "d", args=("--system-metrics-interval", "0.3"))
    try:
        run_id = run_chain(d, "time.sleep(1.2)", env={"ARMORY_SYSTEM_METRICS": "off"})
        client = MlflowClient(tracking_uri=d.store_uri)
        assert not [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]
        # A run tagged armory.system_metrics=off stops getting them.
        c = RawClient(d.socket)
        c.hello()
        _, chain = start(c, "tag-opt-out")
        time.sleep(0.8)
        c.send("log", run=chain["handle"], tags={"armory.system_metrics": "off"})
        c.request("flush", wait="uploaded", timeout_ms=10000)
        before = len(client.get_metric_history(chain["run_id"], "system/system_memory_usage_megabytes"))
        time.sleep(1.0)
        c.request("flush", wait="uploaded", timeout_ms=10000)
        assert before >= 1 and len(client.get_metric_history(chain["run_id"], "system/system_memory_usage_megabytes")) == before
        c.close()
    finally:
        d.stop()


def test_gpus_through_nvml_where_the_library_exists(tmp_path):
    if not ctypes.util.find_library("nvidia-ml"):
        pytest.skip("no libnvidia-ml here: GPU metrics are left out, without an error")
    d = Daemon(tmp_path / "d", args=("--system-metrics-interval", "0.5"))
    try:
        c, _, chain, _ = sampled(d, "gpu", 1.5)
        c.request("flush", wait="uploaded", timeout_ms=10000)
        metrics = MlflowClient(tracking_uri=d.store_uri).get_run(chain["run_id"]).data.metrics
        assert "system/gpu_0_utilization_percentage" in metrics and "system/gpu_0_memory_usage_megabytes" in metrics
        c.close()
    finally:
        d.stop()


def test_runs_of_mlflows_api_get_system_metrics_only_as_mlflow_would_log_them(tmp_path):
    """Through armoryd://, the daemon does not sample a run of MLflow's API: without
    log_system_metrics there are none (as with MLflow directly), and with it MLflow's own monitor
    logs them once per step, with no second sampler doubling steps or adding keys."""
    d = Daemon(tmp_path / "d", args=("--system-metrics-interval", "0.3"))
    try:
        script = textwrap.dedent("""
            import time, mlflow
            mlflow.set_experiment("plugin-sysmetrics")
            with mlflow.start_run() as quiet:
                time.sleep(1.5)
            with mlflow.start_run(log_system_metrics=True) as sampled:
                time.sleep(3.5)
            print(quiet.info.run_id, sampled.info.run_id)
        """)
        env = {**d.env(), "MLFLOW_TRACKING_URI": "armoryd://", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
               "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1"}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        quiet, sampled = out.stdout.split()
        c = RawClient(d.socket)
        c.hello()
        c.request("flush", wait="uploaded", timeout_ms=10000)
        client = MlflowClient(tracking_uri=d.store_uri)
        assert not any(k.startswith("system/") for k in client.get_run(quiet).data.metrics)
        keys = [k for k in client.get_run(sampled).data.metrics if k.startswith("system/")]
        assert keys and not set(keys) & PROCESS_METRICS  # MLflow's monitor's keys, not the daemon's
        for key in keys:
            steps = [m.step for m in client.get_metric_history(sampled, key)]
            assert len(steps) == len(set(steps)), (key, steps)  # no step logged twice
        c.close()
    finally:
        d.stop()
