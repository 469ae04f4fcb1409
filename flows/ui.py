"""`lmforge ui`: the Prefect server and the MLflow UI, side by side, on loopback.

While it runs, `<workspace>/ui.json` says where they are, so `lmforge run` (and `ablate`, `serve`) in
that workspace report to this Prefect server without `PREFECT_API_URL` being set.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from storage.telemetry import TELEMETRY_OFF
from storage.workspace import Workspace

UI_FILE = "ui.json"


def ui_commands(ws: Workspace, host: str, prefect_port: int, mlflow_port: int) -> dict[str, list[str]]:
    from storage.tracking import artifact_location, tracking_uri

    bin_dir = Path(sys.executable).parent
    return {
        "prefect": [str(bin_dir / "prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
        "mlflow": [str(bin_dir / "mlflow"), "server", "--host", host, "--port", str(mlflow_port), "--workers", "1",
                   "--backend-store-uri", tracking_uri(ws.root), "--default-artifact-root", artifact_location(ws.root)],
    }


def serve_uis(ws: Workspace, host: str, prefect_port: int, mlflow_port: int) -> None:
    """Starts both servers, prints their addresses, and stops both on Ctrl-C or when one exits."""
    from storage.tracking import Tracker, redact_uri, tracking_uri

    env = {**os.environ, **TELEMETRY_OFF}
    with ws.init_lock():   # the sqlite store is created here, never by the server racing a pipeline run
        Tracker(ws.root, "lmforge")
    procs = {name: subprocess.Popen(cmd, env=env) for name, cmd in ui_commands(ws, host, prefect_port, mlflow_port).items()}
    record = ws.root / UI_FILE
    record.write_text(json.dumps({"prefect_api_url": f"http://{host}:{prefect_port}/api",
                                  "mlflow_url": f"http://{host}:{mlflow_port}", "pid": os.getpid()}))
    print(f"Prefect UI: http://{host}:{prefect_port}   (`lmforge run -w {ws.root}` reports there while this runs)")
    print(f"MLflow UI:  http://{host}:{mlflow_port}   (tracking store: {redact_uri(tracking_uri(ws.root))})")
    try:
        while all(p.poll() is None for p in procs.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        record.unlink(missing_ok=True)
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=30)


def attached_prefect_api(ws_root: Path, timeout_s: float = 3.0) -> str | None:
    """The Prefect API of a `lmforge ui` running for this workspace, if it answers right now."""
    try:
        url = json.loads((ws_root / UI_FILE).read_text())["prefect_api_url"]
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            return url if response.status == 200 else None
    except (OSError, ValueError, KeyError):
        return None


def mlflow_ui_url(ws_root: Path) -> str:
    """Where the MLflow UI of this workspace is (or will be, with `lmforge ui`'s default port)."""
    try:
        return json.loads((ws_root / UI_FILE).read_text())["mlflow_url"]
    except (OSError, ValueError, KeyError):
        return "http://127.0.0.1:5000"


def attach(ws_root: Path) -> str | None:
    """Points Prefect at the workspace's running UI server, unless `PREFECT_API_URL` already says where."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    url = attached_prefect_api(ws_root)
    if url:
        os.environ["PREFECT_API_URL"] = url
    return url
