"""The project's units under a real systemd, as a lab host runs them: socket activation,
Type=notify with its STATUS= line, who may connect, who may read the results, journald's fields,
reload, the hardening's score, and the GPU drop-in."""
import json
import re
import shlex
import textwrap

from conftest import PYTHON, ROOT, SHARED

STORE = "/var/lib/armory/mlruns"


def example(manager, user="alice", points=200, seconds=0, env=None):
    """The Swift example as `user` (each chain's points paced over `seconds`); returns its run ids
    by name ("evaluation …: parent run ID", "chain NAME: run ID")."""
    out = manager.run(f"{SHARED}/bin/armory-example --points {points} --seconds {seconds}", user=user, env=env).stdout
    runs = dict(re.findall(r"(?:evaluation|chain) (\S+): (?:parent )?run ([0-9a-f]{32})", out))
    assert runs, out
    return runs


def run_file(manager, run_id: str, relative: str) -> str:
    return manager.run(f"cat {STORE}/*/{run_id}/{relative}").stdout


def test_the_first_connection_starts_the_service_which_is_active_only_once_ready(manager):
    manager.run("systemctl stop armoryd.service")
    assert manager.show("armoryd.service", "ActiveState")["ActiveState"] == "inactive"
    assert manager.show("armoryd.socket", "ActiveState")["ActiveState"] == "active"
    status = manager.run("armoryctl status", user="alice")
    assert "running" in status.stdout, status.stderr
    shown = manager.show("armoryd.service", "ActiveState", "SubState", "Type", "StatusText", "MainPID")
    assert (shown["ActiveState"], shown["SubState"], shown["Type"]) == ("active", "running", "notify")
    # READY=1 came with the STATUS= line the daemon keeps current.
    assert shown["StatusText"].startswith("running: ") and "active runs" in shown["StatusText"]
    text = manager.run("systemctl status armoryd.service --no-pager").stdout
    assert "active (running)" in text and "Status: \"running: " in text


def test_a_user_outside_group_armory_is_told_to_join_it(manager):
    for command in ("armoryctl status", f"PYTHONPATH={SHARED}/python {PYTHON} -c 'import armory_track; armory_track.Evaluation(\"x\")'"):
        out = manager.run(command, user="mallory", check=False)
        assert out.returncode != 0
        assert "group 'armory'" in out.stderr and "usermod -aG armory" in out.stderr, out.stderr
    assert manager.run("armoryctl status", user="mallory", check=False).returncode == 4


def test_alices_runs_are_hers_and_she_can_read_the_store_but_not_write_it(manager, alice_env):
    runs = example(manager)
    for run_id in runs.values():
        assert manager.run(f"cat {STORE}/*/{run_id}/tags/mlflow.user", user="alice").stdout == "alice"
    python = manager.run(f"{PYTHON} {SHARED}/python/examples/armory_example.py", user="alice", env=alice_env).stdout
    python_runs = dict(re.findall(r"(?:evaluation|chain) (\S+): (?:parent )?run ([0-9a-f]{32})", python))
    assert len(python_runs) == 3
    # Group armory reads everything of the store (artifacts too), and writes nothing.
    listing = manager.run(f"find {STORE} -type f | head -1000 | xargs cat > /dev/null && ls -R {STORE}", user="alice")
    assert "artifacts" in listing.stdout
    assert manager.run(f"touch {STORE}/intruder", user="alice", check=False).returncode != 0
    assert manager.run("ls /var/lib/armory/state", user="alice", check=False).returncode != 0  # the journal stays private
    # armoryctl mlflow-server opens the store the daemon names (a stand-in `mlflow` prints its arguments).
    manager.run(f"mkdir -p {SHARED}/fake && printf '#!/bin/sh\\necho \"$@\"\\n' > {SHARED}/fake/mlflow && chmod 755 {SHARED}/fake/mlflow")
    served = manager.run("armoryctl mlflow-server --port 5123", user="alice", env={"PATH": f"{SHARED}/fake:/usr/local/bin:/usr/bin:/bin"})
    assert f"--backend-store-uri file://{STORE}" in served.stdout, served.stdout + served.stderr


def test_bob_cannot_end_attach_or_log_into_alices_run(manager, alice_env):
    manager.run(f"nohup {PYTHON} -c " + shlex.quote(textwrap.dedent("""
        import time
        from armory_track import Evaluation
        evaluation = Evaluation("alices")
        evaluation.start()
        time.sleep(60)
    """)) + " > /dev/null 2>&1 &", user="alice", env=alice_env)
    manager.wait_until(lambda: any(r["name"] == "alices" for r in json.loads(manager.run("armoryctl runs --json").stdout)), what="alice's run")
    run = next(r for r in json.loads(manager.run("armoryctl runs --json").stdout) if r["name"] == "alices")
    probe = textwrap.dedent(f"""
        import json, socket, struct
        s = socket.socket(socket.AF_UNIX); s.connect("/run/armory/armoryd.sock")
        def request(seq, **fields):
            payload = json.dumps(dict(seq=seq, **fields)).encode()
            s.sendall(struct.pack(">I", len(payload)) + payload)
            while True:
                n = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
                m = json.loads(s.recv(n, socket.MSG_WAITALL))
                if m.get("seq") == seq and m["op"] in ("reply", "error"):
                    return m
        request(1, op="hello", protocol=1, client="bob")
        print(request(2, op="attach", run_id="{run['run_id']}")["code"])
        print(request(3, op="end", run="{run['handle']}", status="KILLED")["code"])
        s.sendall(b"")
        payload = json.dumps(dict(seq=4, op="log", run="{run['handle']}", metrics=[["stolen", 1]])).encode()
        s.sendall(struct.pack(">I", len(payload)) + payload)
        print(request(5, op="flush", wait="durable").get("op"))
    """)
    out = manager.run(f"{PYTHON} -c {shlex.quote(probe)}", user="bob").stdout.split()
    assert out == ["PERMISSION_DENIED", "PERMISSION_DENIED", "reply"]
    refusal = json.loads(manager.run("armoryctl status --json").stdout)["last_refusal"]
    assert (refusal["code"], refusal["op"]) == ("PERMISSION_DENIED", "log")
    assert "stolen" not in manager.run(f"ls {STORE}/*/{run['run_id']}/metrics").stdout.split()  # (its system/ metrics only)
    manager.run("pkill -u alice -f 'Evaluation(\"alices\")'", check=False)


def test_journald_has_the_run_fields_and_reload_changes_the_log_level_without_a_restart(manager):
    runs = example(manager, points=10)
    entries = manager.journal()
    started = [e for e in entries if e.get("MESSAGE") == "run started" and e.get("RUN_ID") in runs.values()]
    assert len(started) == 3
    uid = manager.run("id -u alice").stdout.strip()
    assert {e["UID"] for e in started} == {uid} and all(e.get("CLIENT_PID") for e in started)
    pid = manager.show("armoryd.service", "MainPID")["MainPID"]
    manager.run("sed -i 's/^log-level:.*//' /etc/armory/armoryd.conf && echo 'log-level: debug' >> /etc/armory/armoryd.conf")
    manager.run("systemctl reload armoryd.service")
    manager.wait_until(lambda: any(e.get("MESSAGE") == "configuration reloaded" and e.get("LOG_LEVEL") == "debug" for e in manager.journal()),
                       what="the log level change in the journal")
    assert manager.show("armoryd.service", "MainPID")["MainPID"] == pid
    # A broken configuration on reload is logged, and the daemon goes on with the one it has.
    manager.run("cp /etc/armory/armoryd.conf /etc/armory/armoryd.conf.good && echo 'flush-interval: [broken' >> /etc/armory/armoryd.conf")
    manager.run("systemctl reload armoryd.service")
    manager.wait_until(lambda: any(e.get("MESSAGE", "").startswith("configuration not reloaded") for e in manager.journal()),
                       what="the configuration error in the journal")
    assert manager.show("armoryd.service", "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}
    assert "running" in manager.run("armoryctl status", user="alice").stdout
    manager.run("mv /etc/armory/armoryd.conf.good /etc/armory/armoryd.conf && systemctl reload armoryd.service")


def test_the_loaded_units_exposure_is_at_most_1_5_and_the_hardening_breaks_no_feature(manager):
    out = manager.run("systemd-analyze security armoryd.service --no-pager").stdout
    score = float(re.search(r"Overall exposure level for armoryd.service: (\d+\.\d+)", out).group(1))
    assert score <= 1.5, out[-2000:]
    # Under it: system metrics of the client process, artifacts (the example logs PNGs).
    runs = example(manager, points=3000, seconds=3)
    chain = runs["benign"]
    metrics = manager.run(f"ls {STORE}/*/{chain}/metrics/system").stdout.split()
    assert "process_memory_rss_megabytes" in metrics and "cpu_utilization_percentage" in metrics, metrics
    assert manager.run(f"find {STORE}/*/{chain}/artifacts -type f | wc -l").stdout.strip() != "0"


def test_the_gpu_drop_in_loads(manager):
    manager.run(f"install -d /etc/systemd/system/armoryd.service.d && install -m 0644 {ROOT}/systemd/gpu.conf /etc/systemd/system/armoryd.service.d/gpu.conf")
    try:
        verified = manager.run("systemd-analyze verify /usr/local/lib/systemd/system/armoryd.service", check=False)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        manager.run("systemctl daemon-reload")
        shown = manager.show("armoryd.service", "PrivateDevices", "DeviceAllow")
        assert shown["PrivateDevices"] == "no" and "/dev/nvidiactl rw" in shown["DeviceAllow"]
    finally:
        manager.run("rm -f /etc/systemd/system/armoryd.service.d/gpu.conf && systemctl daemon-reload")


STREAM = textwrap.dedent("""
    import sys, time
    from armory_track import Evaluation
    points, name = int(sys.argv[1]), sys.argv[2]
    evaluation = Evaluation(name)
    with evaluation.add_chain("chain") as chain:
        pass
    with evaluation.run():
        with chain.run():
            for step in range(points):
                chain.log_metric("loss", step / points, step=step)
                if step % 1000 == 999:
                    time.sleep(0.2)
    print(chain.run_id)
""")


def stream(manager, names, points, alice_env):
    """Starts one streaming evaluation per name as alice, in the background; returns the
    command that waits for them all and prints each one's chain run id."""
    manager.run(f"cat > /tmp/stream.py <<'PY'\n{STREAM}\nPY\nchmod 644 /tmp/stream.py")
    launch = " ".join(f"({PYTHON} /tmp/stream.py {points} {name} > /tmp/{name}.out 2> /tmp/{name}.err; echo $? > /tmp/{name}.rc) &" for name in names)
    manager.run(f"cd /tmp && {launch} true", user="alice", env=alice_env)


def finished(manager, names):
    return all(manager.run(f"test -s /tmp/{name}.rc", check=False).returncode == 0 for name in names)


def assert_streams_complete(manager, names, points):
    for name in names:
        rc = manager.run(f"cat /tmp/{name}.rc").stdout.strip()
        assert rc == "0", manager.run(f"cat /tmp/{name}.err").stdout[-3000:]
        run_id = manager.run(f"cat /tmp/{name}.out").stdout.split()[-1]
        assert manager.run(f"wc -l < {STORE}/*/{run_id}/metrics/loss").stdout.strip() == str(points), name
        assert "status: 3" in manager.run(f"cat {STORE}/*/{run_id}/meta.yaml").stdout, name  # FINISHED


def test_systemctl_restart_under_streaming_evaluations_fails_none_and_loses_nothing(manager, alice_env):
    names = [f"restart{i}" for i in range(4)]
    restarts = int(manager.show("armoryd.service", "NRestarts")["NRestarts"])
    before = manager.show("armoryd.service", "MainPID")["MainPID"]
    stream(manager, names, 20_000, alice_env)
    manager.run("sleep 1.5 && systemctl restart armoryd.service")
    assert manager.show("armoryd.service", "MainPID")["MainPID"] != before
    manager.wait_until(lambda: finished(manager, names), timeout=120, what="the evaluations to end")
    assert_streams_complete(manager, names, 20_000)
    assert int(manager.show("armoryd.service", "NRestarts")["NRestarts"]) == restarts  # a restart asked for, not a failure


def test_the_watchdog_kills_and_restarts_a_wedged_daemon_and_nothing_acknowledged_is_lost(manager, alice_env):
    manager.run("install -d /etc/systemd/system/armoryd.service.d && printf '[Service]\\nWatchdogSec=4\\n' > /etc/systemd/system/armoryd.service.d/watchdog.conf"
                " && systemctl daemon-reload && systemctl restart armoryd.service")
    try:
        names = ["wedged"]
        restarts = int(manager.show("armoryd.service", "NRestarts")["NRestarts"])
        stream(manager, names, 20_000, alice_env)
        manager.run("sleep 1.5 && kill -STOP $(systemctl show -p MainPID --value armoryd.service)")
        manager.wait_until(lambda: int(manager.show("armoryd.service", "NRestarts")["NRestarts"]) > restarts, timeout=60,
                           what="the watchdog to restart the daemon")
        entries = manager.journal()
        assert any("watchdog" in e.get("MESSAGE", "").lower() for e in entries if e.get("_PID") == "1" or e.get("UNIT") == "armoryd.service")
        manager.wait_until(lambda: finished(manager, names), timeout=180, what="the evaluation to end")
        assert_streams_complete(manager, names, 20_000)
    finally:
        manager.run("rm -f /etc/systemd/system/armoryd.service.d/watchdog.conf && systemctl daemon-reload && systemctl restart armoryd.service")


def test_alices_user_unit_serves_her_from_her_own_store(manager):
    uid = manager.run("id -u alice").stdout.strip()
    manager.run(f"systemctl start dbus.socket dbus.service && systemctl start user@{uid}.service")
    session = {"XDG_RUNTIME_DIR": f"/run/user/{uid}"}
    try:
        manager.run("systemctl --user daemon-reload && systemctl --user enable --now armoryd.socket", user="alice", env=session)
        runs = example(manager, user="alice", env=session)
        shown = manager.run("systemctl --user show armoryd.service -p ActiveState -p StatusText", user="alice", env=session).stdout
        assert "ActiveState=active" in shown and "StatusText=running: " in shown
        for run_id in runs.values():
            assert manager.run(f"cat /home/alice/.armory/mlruns/*/{run_id}/tags/mlflow.user", user="alice").stdout == "alice"
        status = json.loads(manager.run("armoryctl status --json", user="alice", env=session).stdout)
        assert status["socket"] == f"/run/user/{uid}/armory/armoryd.sock" and status["systemd_user"] is True
        stop = manager.run("armoryctl stop", user="alice", env=session, check=False)
        assert stop.returncode == 1 and "systemctl --user stop armoryd.service" in stop.stderr
    finally:
        manager.run("systemctl --user disable --now armoryd.socket armoryd.service", user="alice", env=session, check=False)
        manager.run(f"systemctl stop user@{uid}.service", check=False)


def test_under_the_hardening_a_sync_reaches_an_mlflow_server_over_ip(manager, tmp_path):
    from mlflow.tracking import MlflowClient
    from testbed import MLflowServer

    runs = example(manager, points=50)
    server = MLflowServer(tmp_path / "mlflow")  # on the host's loopback: the test bed shares its network
    try:
        synced = manager.run(f"armoryctl sync --to {server.url} --experiment armory-example", timeout=300)
        assert "complete" in synced.stdout, synced.stdout + synced.stderr
        client = MlflowClient(tracking_uri=server.url)
        experiment = client.get_experiment_by_name("armory-example")
        copied = {r.data.tags["armory.sync.source_run"] for r in client.search_runs([experiment.experiment_id])}
        assert set(runs.values()) <= copied
    finally:
        server.stop()


def test_a_rotated_password_in_etc_armory_credentials_reaches_the_daemon_on_reload(manager, alice_env, tmp_path):
    """The lab's server changes the tracking user's password while alice evaluates: her records
    wait (needs-credentials), her evaluation ends with a warning, and once the admin writes the new
    password to /etc/armory/credentials (readable by the daemon's user alone) and reloads the unit,
    everything lands."""
    import os

    import requests
    from mlflow.tracking import MlflowClient
    from testbed import MLflowServer

    admin = ("admin", "armory-test-Admin-1")
    server = MLflowServer(tmp_path / "auth", extra_args=("--app-name", "basic-auth"),
                          env={"MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret", "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1]})
    api = f"{server.url}/api/2.0/mlflow/users"

    def write_credentials(password):
        manager.run(f"install -m 0600 -o armory -g armory /dev/null /etc/armory/credentials && printf '%s\\n' "
                    f"'[{server.url}]' 'mlflow_tracking_username = lab' 'mlflow_tracking_password = {password}' > /etc/armory/credentials")

    manager.run("cp /etc/armory/armoryd.conf /etc/armory/armoryd.conf.before-auth")
    try:
        requests.post(f"{api}/create", json={"username": "lab", "password": "first-Password-1"}, auth=admin, timeout=30).raise_for_status()
        requests.patch(f"{api}/update-admin", json={"username": "lab", "is_admin": True}, auth=admin, timeout=30).raise_for_status()
        write_credentials("first-Password-1")
        manager.run(f"echo 'tracking-uri: {server.url}' >> /etc/armory/armoryd.conf && systemctl restart armoryd.service")
        assert "mlflow_tracking_password" not in manager.run("cat /etc/armory/credentials", user="alice", check=False).stdout
        first = example(manager, points=50)  # lands with the first password

        requests.patch(f"{api}/update-password", json={"username": "lab", "password": "second-Password-2"}, auth=admin, timeout=30).raise_for_status()
        # (It cannot know its run ids meanwhile: the server has created no run.)
        evaluation = STREAM.replace("print(chain.run_id)", "print('ended')")
        manager.run(f"cat > /tmp/rotated.py <<'PY'\n{evaluation}\nPY\nchmod 644 /tmp/rotated.py")
        ended = manager.run(f"cd /tmp && {PYTHON} /tmp/rotated.py 2000 rotated", user="alice", env=alice_env, check=False)
        assert ended.returncode == 0 and "ended" in ended.stdout, ended.stderr  # it went on: its records are safe
        assert "ArmoryWarning" in ended.stderr and "401" in ended.stderr, ended.stderr
        status = json.loads(manager.run("armoryctl status --json", user="alice", check=False).stdout)  # exit 1: degraded
        assert status["destinations"][0]["state"] == "needs-credentials" and status["pending_records"] > 0
        assert any("needs credentials" in e.get("MESSAGE", "") for e in manager.journal())

        write_credentials("second-Password-2")
        manager.run("systemctl reload armoryd.service")
        assert manager.run("armoryctl flush --wait --timeout 120", user="alice").returncode == 0
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = admin
        try:
            client = MlflowClient(tracking_uri=server.url)
            [chain] = client.search_runs([client.get_experiment_by_name("rotated").experiment_id], filter_string="tags.`mlflow.parentRunId` != ''")
            assert len(client.get_metric_history(chain.info.run_id, "loss")) == 2000
            assert chain.info.status == "FINISHED"
            assert all(client.get_run(r).info.status == "FINISHED" for r in first.values())
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    finally:
        manager.run("mv /etc/armory/armoryd.conf.before-auth /etc/armory/armoryd.conf && rm -f /etc/armory/credentials"
                    " && systemctl restart armoryd.service", check=False)
        server.stop()
