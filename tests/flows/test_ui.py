"""`lmforge ui` starts the Prefect server and the MLflow UI on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil

from cliutil import REPO_ROOT, free_port


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 150) -> bytes:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout} s")


def run_without_prefect_env(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=env, timeout=600)


def flow_run_names(api_url: str) -> list[str]:
    request = urllib.request.Request(f"{api_url}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return [run["name"] for run in json.loads(response.read())]


def test_ui_serves_prefect_and_mlflow_on_loopback(tmp_path, shared_data):
    prefect_port, mlflow_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "-w", str(tmp_path / "ws"),
                             "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect")})
    try:
        assert b"true" in wait_for(f"http://127.0.0.1:{prefect_port}/api/health", proc)
        assert wait_for(f"http://127.0.0.1:{mlflow_port}/health", proc).strip() == b"OK"
        listening = [c.laddr for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        for port in (prefect_port, mlflow_port):
            binds = [addr.ip for addr in listening if addr.port == port]
            assert binds and set(binds) == {"127.0.0.1"}, binds
        # a run in the same workspace reports to this server without PREFECT_API_URL being set
        recipe = tmp_path / "r.yaml"
        recipe.write_text(json.dumps({"name": "attached", "ingest": {"sources": [
            {"name": "d", "kind": "jsonl", "paths": [str(shared_data / "raw/dolma_ccnet_cc_en_head-0091.jsonl")]}]}}))
        out = run_without_prefect_env(["run", str(recipe), "-w", str(tmp_path / "ws")])
        assert out.returncode == 0, out.stderr[-2000:]
        api = f"http://127.0.0.1:{prefect_port}/api"
        assert f"Prefect: {api}" in out.stdout and "attached" in flow_run_names(api)
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    assert f"Prefect UI: http://127.0.0.1:{prefect_port}" in output
    assert f"MLflow UI:  http://127.0.0.1:{mlflow_port}" in output
    assert not (tmp_path / "ws" / "ui.json").exists()          # gone with the servers: later runs do not wait for it


# `lmforge ui` with two stand-in servers (sleepers) and no health checks: what it does on a signal, in seconds
STAND_IN_UI = """
import sys
import flows.ui, storage.tracking
sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
flows.ui.ui_commands = lambda plan: {"prefect": sleeper, "mlflow": sleeper}
flows.ui.wait_until_ready = lambda plan, procs: None
storage.tracking.Tracker = lambda *args: None
from flows.cli import main
sys.argv = ["lmforge", "ui", "-w", sys.argv[1]]
main()
"""


def test_sigterm_stops_both_servers_like_ctrl_c(tmp_path):
    """`lmforge ui &` is stopped with `kill %1` (SIGTERM): both servers go with it, and so does ui.json.

    It left them running (holding their ports, so the next `lmforge ui` could not start) and ui.json behind."""
    ws, log = tmp_path / "ws", tmp_path / "ui.log"
    with log.open("w") as out:      # a file, not a pipe: servers left running would hold a pipe open
        proc = subprocess.Popen([sys.executable, "-c", STAND_IN_UI, str(ws)], cwd=REPO_ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    servers: list[psutil.Process] = []
    try:
        deadline = time.time() + 60
        while not (ws / "ui.json").exists():
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
        servers = psutil.Process(proc.pid).children()
        assert len(servers) == 2
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        _, alive = psutil.wait_procs(servers, timeout=10)
        assert not alive, f"servers left running after SIGTERM: {[p.pid for p in alive]}\n{log.read_text()}"
        assert not (ws / "ui.json").exists()
        assert proc.returncode == 128 + signal.SIGTERM
    finally:
        for process in [psutil.Process(proc.pid), *servers] if proc.poll() is None else servers:
            if process.is_running():
                process.kill()
