"""MLflow's own UI opens an Armory evaluation on its runs, the chains under their parent (issue 24),
checked the way a user looks: headless Chromium on the page `armoryctl mlflow-server` links to."""
import os
import re
import shutil
import subprocess
import tempfile
import threading
import urllib.request

import pytest

from conftest import BIN, ROOT, free_port
from examplecheck import run_example
from testbed import wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs a browser: install Debian's chromium (apt-get install chromium)")


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.read() == b"OK"
    except OSError:
        return False


def rendered(url: str) -> str:
    """The page's DOM once MLflow's scripts have rendered it."""
    with tempfile.TemporaryDirectory(prefix="armory-chromium-") as profile:
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=" + profile, "--window-size=1400,900",
             "--virtual-time-budget=30000", "--dump-dom", url],
            capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_link_armoryctl_prints_opens_the_evaluation_on_its_runs_with_the_chains_under_the_parent(daemon):
    parent, chains = run_example(daemon)
    env = dict(daemon.env(), PATH=str(ROOT / ".venv" / "bin") + ":" + os.environ["PATH"])
    assert subprocess.run([str(BIN / "armoryctl"), "flush", "--wait"], env=env, capture_output=True, timeout=120).returncode == 0
    port = free_port()
    proc = subprocess.Popen([str(BIN / "armoryctl"), "mlflow-server", "--port", str(port), "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        banner = [proc.stderr.readline() for _ in range(3)]
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # the server's log: never let it fill the pipe
        links = dict(re.findall(r"^  (\S+): (http://\S+)$", "".join(banner), re.M))
        assert set(links) == {"armory-example"}, banner
        link = links["armory-example"]
        experiment_id = re.search(r"#/experiments/(\d+)\?", link).group(1)
        wait_until(lambda: healthy(port) or proc.poll() is not None, 90, "mlflow server did not start")
        assert proc.poll() is None, "mlflow server exited"

        page = rendered(link)
        # The runs table, not the GenAI "Start tracing your LLM application" page.
        assert "Start tracing" not in page
        assert 'data-testid="sort-header-Run Name"' in page
        # One row: the parent, with the button that unfolds its chains; all three runs counted.
        rows = set(re.findall(rf'href="#/experiments/{experiment_id}/runs/([0-9a-f]{{32}})"', page))
        assert rows == {parent}, (rows, parent, chains)
        assert len(re.findall(r"runnamecellrenderer[^\"]*\"[^>]*>\s*<span role=\"img\"", page)) == 1
        assert re.search(r"<strong>3</strong>\s*matching runs", page)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
