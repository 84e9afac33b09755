"""armoryd's configuration: file, environment and flags with their precedence, --check-config,
clear errors naming the setting, and reload on SIGHUP (what `systemctl reload` sends)."""
import os
import signal
import stat
import subprocess
import time

from conftest import BIN, RawClient
from test_systemd import NotifySocket


def armoryd(*args, env=None):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ARMORY_", "MLFLOW_TRACKING"))}
    return subprocess.run([str(BIN / "armoryd"), *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def settings(output):
    table = {}
    for line in output.splitlines()[1:]:
        if "(" in line:
            key, value = line.split(None, 1)
            table[key] = (value.rsplit("  (", 1)[0], value.rsplit("  (", 1)[1].rstrip(")"))
    return table


def test_flags_win_over_the_environment_which_wins_over_the_file(tmp_path):
    conf = tmp_path / "armoryd.conf"
    conf.write_text("flush-interval: 2\nupload-concurrency: 8\nsocket-mode: '660'\nlog-level: warning\n")
    out = armoryd("--config", str(conf), "--check-config", "--socket", str(tmp_path / "s.sock"), "--upload-concurrency", "3",
                  env={"ARMORY_FLUSH_INTERVAL": "5", "ARMORY_UPLOAD_CONCURRENCY": "6", "MLFLOW_TRACKING_URI": "http://user:secret@mlflow.lab:5000"})
    assert out.returncode == 0, out.stderr
    table = settings(out.stdout)
    assert out.stdout.splitlines()[0] == f"configuration file: {conf}" and "configuration is valid" in out.stdout
    assert table["upload-concurrency"] == ("3", "flag --upload-concurrency")
    assert table["flush-interval"] == ("5", "environment ARMORY_FLUSH_INTERVAL")
    assert table["socket-mode"] == ("660", f"file {conf}") and table["log-level"] == ("warning", f"file {conf}")
    assert table["request-timeout"][1] == "default"
    assert table["tracking-uri"] == ("http://mlflow.lab:5000", "environment MLFLOW_TRACKING_URI")  # credentials never printed
    assert "secret" not in out.stdout


def test_bad_configuration_is_an_error_naming_the_setting(tmp_path):
    cases = {
        "flush-intervall: 2\n": "Unknown setting 'flush-intervall'",
        "flush-interval: soon\n": "Setting 'flush-interval' (file",
        "max-backlog-bytes: lots\n": "Setting 'max-backlog-bytes'",
        "socket-mode: '999'\n": "Setting 'socket-mode'",
        "journal-fsync: maybe\n": "Setting 'journal-fsync'",
        "tracking-uri: ftp://x\n": "Setting 'tracking-uri'",
        "home: [a, b]\n": "Setting 'home'",
        "flush-interval: [1\n": "not valid YAML",
    }
    for text, expected in cases.items():
        conf = tmp_path / "bad.conf"
        conf.write_text(text)
        out = armoryd("--config", str(conf), "--check-config")
        assert out.returncode == 1, (text, out.stdout, out.stderr)
        assert expected in out.stderr and (str(conf) in out.stderr or "tracking-uri" in expected), (text, out.stderr)
    out = armoryd("--config", str(tmp_path / "missing.conf"), "--check-config")
    assert out.returncode == 1 and "does not exist" in out.stderr
    out = armoryd("--check-config", "--socket", str(tmp_path / "s.sock"), env={"ARMORY_MAX_CONNECTIONS": "none"})
    assert out.returncode == 1 and "Setting 'max-connections' (environment ARMORY_MAX_CONNECTIONS)" in out.stderr
    # The default file is optional: no file, defaults only.
    out = armoryd("--check-config", "--socket", str(tmp_path / "s.sock"), env={"XDG_CONFIG_HOME": str(tmp_path / "nothing")})
    assert out.returncode == 0 and out.stdout.startswith("configuration file: none")


def test_the_daemon_runs_with_the_files_settings_and_reloads_on_sighup(tmp_path):
    conf_home = tmp_path / "config"
    (conf_home / "armory").mkdir(parents=True)
    conf = conf_home / "armory" / "armoryd.conf"  # the user unit's default place (root's is /etc/armory/armoryd.conf)
    home = tmp_path / "home"
    conf.write_text(f"home: {home}\nsocket: {tmp_path / 'd.sock'}\nsocket-mode: '660'\nlog-level: info\n")
    notify = NotifySocket(tmp_path / "notify.sock")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ARMORY_", "MLFLOW_TRACKING", "NOTIFY_", "LISTEN_"))}
    log = open(tmp_path / "armoryd.log", "wb")
    explicit = ["--config", str(conf)] if os.getuid() == 0 else []
    proc = subprocess.Popen([str(BIN / "armoryd"), *explicit], env={**base, "XDG_CONFIG_HOME": str(conf_home), "NOTIFY_SOCKET": notify.path},
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        notify.wait_for("READY", "1")
        assert stat.S_IMODE(os.stat(tmp_path / "d.sock").st_mode) == 0o660
        c = RawClient(str(tmp_path / "d.sock"))
        c.hello()
        assert c.request("status")["destination"] == f"file://{home}/mlruns"
        # A reload: the new log level applies, a setting that needs a restart is named.
        conf.write_text(f"home: {home}\nsocket: {tmp_path / 'd.sock'}\nsocket-mode: '660'\nlog-level: debug\nflush-interval: 3\n")
        before = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING", "1", after=before)
        notify.wait_for("READY", "1", after=before)
        text = wait_for_log(tmp_path / "armoryd.log", "configuration reloaded")
        assert "log_level=debug" in text and "setting=flush-interval" in text and "next restart" in text
        # A broken file on reload: reported, the running configuration kept, clients still served.
        conf.write_text("flush-interval: [\n")
        proc.send_signal(signal.SIGHUP)
        wait_for_log(tmp_path / "armoryd.log", "configuration not reloaded")
        assert c.request("status")["state"] == "running"
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        notify.close()


def wait_for_log(path, needle, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = path.read_text()
        if needle in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"'{needle}' not logged: {path.read_text()[-2000:]}")
