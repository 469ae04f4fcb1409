"""`lmforge ui`: the Prefect server and the MLflow UI, side by side, on loopback."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from storage.telemetry import TELEMETRY_OFF
from storage.tracking import Tracker, artifact_location, redact_uri, tracking_uri
from storage.workspace import Workspace


def ui_commands(ws: Workspace, host: str, prefect_port: int, mlflow_port: int) -> dict[str, list[str]]:
    bin_dir = Path(sys.executable).parent
    return {
        "prefect": [str(bin_dir / "prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
        "mlflow": [str(bin_dir / "mlflow"), "server", "--host", host, "--port", str(mlflow_port), "--workers", "1",
                   "--backend-store-uri", tracking_uri(ws.root), "--default-artifact-root", artifact_location(ws.root)],
    }


def serve_uis(ws: Workspace, host: str, prefect_port: int, mlflow_port: int) -> None:
    """Starts both servers, prints their addresses, and stops both on Ctrl-C or when one exits."""
    env = {**os.environ, **TELEMETRY_OFF}
    with ws.init_lock():   # the sqlite store is created here, never by the server racing a pipeline run
        Tracker(ws.root, "lmforge")
    procs = {name: subprocess.Popen(cmd, env=env) for name, cmd in ui_commands(ws, host, prefect_port, mlflow_port).items()}
    print(f"Prefect UI: http://{host}:{prefect_port}   (set PREFECT_API_URL=http://{host}:{prefect_port}/api "
          "before `lmforge run` to see runs there)")
    print(f"MLflow UI:  http://{host}:{mlflow_port}   (tracking store: {redact_uri(tracking_uri(ws.root))})")
    try:
        while all(p.poll() is None for p in procs.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=30)
