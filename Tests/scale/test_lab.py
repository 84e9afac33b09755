"""The lab deployment: one armoryd per host, every host feeding one `mlflow server` on PostgreSQL
(deploy/testbed.py: hosts in network namespaces where the machine allows). Records are checked
with the real MLflow client against the server."""
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy"))
from lab_evaluation import metric_value  # noqa: E402
from testbed import Lab  # noqa: E402

BIN = Path(os.environ.get("ARMORY_BIN", ROOT / ".build" / "debug"))
HOSTS = 4


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("lab"), hosts=HOSTS, armoryd=BIN / "armoryd")
    yield lab
    lab.close()


def start_evaluation(host, experiment: str, label: str, **options) -> subprocess.Popen:
    argv = [sys.executable, str(ROOT / "deploy" / "lab_evaluation.py"), "--experiment", experiment, "--label", label]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return subprocess.Popen(argv, env=host.client_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)


def finish(processes, timeout=240):
    deadline = time.time() + timeout
    for label, process in processes.items():
        out, _ = process.communicate(timeout=max(1, deadline - time.time()))
        assert process.returncode == 0 and f"done {label}" in out, f"evaluation {label} failed:\n{out}"


def armoryctl(host, *args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "armoryctl"), *args, "--socket", host.socket], capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"armoryctl {' '.join(args)} on host {host.index}: {result.stdout}{result.stderr}"
    return result


def wait_uploaded(hosts, timeout=180):
    for host in hosts:
        armoryctl(host, "flush", "--wait", "--timeout", str(timeout))


def status(host) -> dict:
    """`armoryctl status --json`: exit 0 running, 1 degraded (a destination unreachable)."""
    result = armoryctl(host, "status", "--json", check=False)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def written_metrics(host) -> int:
    return status(host)["metrics_written"]


def check_landed(lab, experiment: str, labels, chains=2, steps=200, keys=1):
    """Every evaluation in `labels` is in the one experiment `experiment`, exactly once: a parent
    with its chains linked to it, every param, tag and artifact, and every metric point."""
    client = MlflowClient(lab.url)
    found = [e for e in client.search_experiments(filter_string=f"name = '{experiment}'")]
    assert len(found) == 1, f"{len(found)} experiments named {experiment}"
    runs = client.search_runs([found[0].experiment_id], max_results=5000)
    assert len(runs) == len(labels) * (1 + chains), f"{len(runs)} runs for {len(labels)} evaluations"
    parents = {r.data.tags.get("lab.label"): r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert sorted(parents) == sorted(labels)
    by_name = {}
    for r in runs:
        if "mlflow.parentRunId" in r.data.tags:
            assert r.info.run_name not in by_name, f"chain run {r.info.run_name} twice"
            by_name[r.info.run_name] = r
    for label in labels:
        for c in range(chains):
            run = by_name[f"{label}-c{c}"]
            assert run.data.tags["mlflow.parentRunId"] == parents[label].info.run_id
            assert run.info.status == "FINISHED" and parents[label].info.status == "FINISHED"
            assert run.data.params == {"host_label": label}
            assert run.data.tags["lab.chain"] == str(c)
            for k in range(keys):
                history = sorted(client.get_metric_history(run.info.run_id, f"m{k}"), key=lambda m: m.step)
                assert [m.step for m in history] == list(range(steps)), f"{label}-c{c} m{k}: {len(history)} points"
                assert [m.value for m in history] == [metric_value(label, c, k, s) for s in range(steps)]
            artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "reports")]
            assert artifacts == ["reports/report.txt"]
            text = Path(client.download_artifacts(run.info.run_id, "reports/report.txt")).read_text()
            assert text == f"{label} chain {c}\n" * 100


def test_every_host_reaches_the_server_over_its_own_link(lab):
    assert len(lab.hosts) == HOSTS
    for host in lab.hosts:
        assert status(host)["destinations"][0]["destination"].startswith(host.server_url)
    if lab.namespaces:  # each daemon really lives in its namespace: the server's loopback is not its own
        for host in lab.hosts:
            probe = subprocess.run(host.link.command([sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {lab.server.port}), 2)"]),
                                   capture_output=True)
            assert probe.returncode != 0


def test_four_hosts_times_eight_evaluations_land_exactly_once(lab):
    experiment = f"lab-{uuid.uuid4().hex[:8]}"
    before = sum(written_metrics(h) for h in lab.hosts)
    processes = {}
    for host in lab.hosts:
        for e in range(8):
            label = f"h{host.index}-e{e}"
            processes[label] = start_evaluation(host, experiment, label, steps=200, keys=2)
    finish(processes)
    wait_uploaded(lab.hosts)
    check_landed(lab, experiment, list(processes), steps=200, keys=2)
    # Uploads counted on the daemons' side: MLflow would drop an exact duplicate silently.
    assert sum(written_metrics(h) for h in lab.hosts) - before == len(processes) * 2 * 200 * 2


def test_hosts_creating_the_same_experiment_at_the_same_moment_share_it(lab):
    experiment = f"lab-race-{uuid.uuid4().hex[:8]}"
    start_at = time.time() + 3  # every process imported and connected by then
    processes = {f"h{h.index}-race{e}": start_evaluation(h, experiment, f"h{h.index}-race{e}", start_at=start_at, steps=20)
                 for h in lab.hosts for e in range(2)}
    finish(processes)
    wait_uploaded(lab.hosts)
    check_landed(lab, experiment, list(processes), steps=20)


def test_server_restart_mid_run_every_host_recovers_on_its_own(lab):
    experiment = f"lab-restart-{uuid.uuid4().hex[:8]}"
    processes = {f"h{h.index}-r{e}": start_evaluation(h, experiment, f"h{h.index}-r{e}", steps=300, pace=12)
                 for h in lab.hosts for e in range(2)}
    time.sleep(4)
    lab.server.stop()
    time.sleep(6)  # every host retries against a dead server meanwhile; evaluations keep logging
    lab.server.start()
    finish(processes)
    wait_uploaded(lab.hosts, timeout=240)
    check_landed(lab, experiment, list(processes), steps=300)
    for host in lab.hosts:
        assert host.proc.poll() is None, f"host {host.index}'s daemon exited"


def test_one_host_killed_the_others_unaffected_and_its_backlog_lands_after_restart(lab):
    experiment = f"lab-crash-{uuid.uuid4().hex[:8]}"
    victim, others = lab.hosts[0], lab.hosts[1:]
    victim.link.down()  # its uploads stall, so that a backlog is journaled when it dies
    try:
        stalled = {f"h0-k{e}": start_evaluation(victim, experiment, f"h0-k{e}", steps=150) for e in range(4)}
        finish(stalled)  # ended runs: every record acked durable by the victim's journal
        assert status(victim)["destinations"][0]["pending_records"] > 0
        running = {f"h{h.index}-k{e}": start_evaluation(h, experiment, f"h{h.index}-k{e}", steps=150, pace=4)
                   for h in others for e in range(2)}
        time.sleep(1)
        victim.kill()
        finish(running)
        wait_uploaded(others)
        client = MlflowClient(lab.url)
        exp = client.get_experiment_by_name(experiment)
        names = {r.info.run_name for r in client.search_runs([exp.experiment_id], max_results=5000)}
        assert all(f"{label}-c{c}" in names for label in running for c in range(2))
    finally:
        victim.link.up()
    victim.start()
    wait_uploaded([victim])
    check_landed(lab, experiment, list(stalled) + list(running), steps=150)
