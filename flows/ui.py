"""`lmforge ui`: the Prefect server and the MLflow UI, side by side, on loopback.

While it runs, `<workspace>/ui.json` says where they are, so `lmforge run` (and `ablate`, `serve`) in
that workspace report to this Prefect server without `PREFECT_API_URL` being set.

With `--backend postgresql://...` both servers keep their records in that PostgreSQL (storage/postgres.py)
and MLflow serves the artifact store (`--artifacts`): runs then log to the MLflow server, not to a
sqlite file, so runs on other machines (`PREFECT_API_URL`, `MLFLOW_TRACKING_URI`) land in the same place.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from storage.postgres import Backend
from storage.telemetry import TELEMETRY_OFF
from storage.tracking import UI_FILE, read_ui_record
from storage.workspace import Workspace

READY_TIMEOUT_S = 300       # Prefect's first start on a fresh PostgreSQL runs its migrations (~30 s, more when loaded)


class UIError(RuntimeError):
    """The `lmforge ui` this workspace records cannot be used (a run must not log somewhere else silently)."""


@dataclass(frozen=True)
class UIPlan:
    """What `lmforge ui` starts: addresses, and with a backend, where the records and artifacts go."""

    ws: Workspace
    host: str
    prefect_port: int
    mlflow_port: int
    backend: Backend | None = None
    artifacts: str | None = None

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    def mlflow_store(self) -> str:
        from storage.tracking import workspace_store_uri

        if self.backend is None:
            return os.environ.get("MLFLOW_TRACKING_URI") or workspace_store_uri(self.ws.root)
        return self.backend.url("postgresql+psycopg", self.backend.database_for("mlflow"))

    def prefect_store(self) -> str | None:
        """None: Prefect's own sqlite in its home folder."""
        return self.backend and self.backend.url("postgresql+asyncpg", self.backend.database_for("prefect"))


def plan_ui(ws: Workspace, host: str, prefect_port: int, mlflow_port: int, backend_url: str | None = None,
            artifacts: str | None = None) -> UIPlan:
    """Checks the settings (and with a backend, that PostgreSQL lets us in; its databases are created)."""
    from storage.postgres import BackendError, parse_backend, prepare_databases

    if backend_url is None:
        if artifacts:
            raise BackendError("--artifacts needs --backend: the sqlite-backed UI keeps artifacts in the workspace")
        return UIPlan(ws, host, prefect_port, mlflow_port)
    backend = parse_backend(backend_url)
    prepare_databases(backend)
    return UIPlan(ws, host, prefect_port, mlflow_port, backend, artifact_destination(ws, artifacts))


def artifact_destination(ws: Workspace, artifacts: str | None) -> str:
    """`--artifacts`: a directory (made absolute) or a URI MLflow stores artifacts at (s3://, gs://, ...)."""
    if artifacts and "://" in artifacts:
        return artifacts
    return str(Path(artifacts).expanduser().resolve() if artifacts else ws.root / "mlartifacts")


def ui_commands(plan: UIPlan) -> dict[str, list[str]]:
    from storage.tracking import artifact_location

    bin_dir = Path(sys.executable).parent
    mlflow = [str(bin_dir / "mlflow"), "server", "--host", plan.host, "--port", str(plan.mlflow_port),
              "--workers", "1", "--backend-store-uri", plan.mlflow_store()]
    if plan.backend is None:
        mlflow += ["--default-artifact-root", artifact_location(plan.ws.root)]
    else:
        # proxied artifacts: runs anywhere upload through this server, no shared mount or cloud keys needed
        mlflow += ["--serve-artifacts", "--artifacts-destination", plan.artifacts]
    return {"prefect": [str(bin_dir / "prefect"), "server", "start", "--host", plan.host,
                        "--port", str(plan.prefect_port)],
            "mlflow": mlflow}


def ui_env(plan: UIPlan) -> dict[str, str]:
    """The servers' environment: telemetry off, and with a backend its URLs (no password) and `PGPASSWORD`."""
    env = {**os.environ, **TELEMETRY_OFF}
    if plan.backend is not None:
        env.update(plan.backend.env())
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = plan.prefect_store()
        env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)      # the older name of the same setting: ours only
    return env


def serve_uis(plan: UIPlan) -> None:
    """Starts both servers, prints their addresses, and stops both on Ctrl-C or when one exits."""
    from storage.tracking import Tracker, redact_uri

    stop_on_sigterm()
    record = plan.ws.root / UI_FILE
    record.unlink(missing_ok=True)      # a stale one (killed ui) must not send runs to a dead server meanwhile
    if plan.backend is None:
        with plan.ws.init_lock():   # the sqlite store is created here, never by the server racing a pipeline run
            Tracker(plan.ws.root, "lmforge")
    procs = {name: subprocess.Popen(cmd, env=ui_env(plan)) for name, cmd in ui_commands(plan).items()}
    try:
        database = f"; database: {plan.prefect_store()}" if plan.backend else ""
        print(f"Prefect UI: http://{plan.host}:{plan.prefect_port}   (`lmforge run -w {plan.ws.root}` reports "
              f"there while this runs{database})", flush=True)
        print(f"MLflow UI:  {plan.mlflow_url}   (tracking store: {redact_uri(plan.mlflow_store())}"
              + (f"; artifacts: {redact_uri(plan.artifacts)})" if plan.artifacts else ")"), flush=True)
        wait_until_ready(plan, procs)
        if plan.backend is not None:
            store_first_block(plan)
        record.write_text(json.dumps(ui_record(plan)))
        if plan.backend is not None:
            print(other_machines_hint(plan), flush=True)
        while all(p.poll() is None for p in procs.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        record.unlink(missing_ok=True)
        stop(procs)


def stop_on_sigterm() -> None:
    """SIGTERM (`kill`, `kill %1` of `lmforge ui &`) unwinds like Ctrl-C: both servers stop and ui.json goes.
    Without it the servers outlived lmforge, holding their ports, and ui.json stayed behind."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def ui_record(plan: UIPlan) -> dict[str, object]:
    """ui.json: where the servers are; with a backend, also the MLflow server runs must log to."""
    record: dict[str, object] = {"prefect_api_url": plan.prefect_api_url, "mlflow_url": plan.mlflow_url,
                                 "pid": os.getpid()}
    if plan.backend is not None:
        record |= {"mlflow_tracking_uri": plan.mlflow_url, "backend": plan.backend.url("postgresql", plan.backend.database)}
    return record


def store_first_block(plan: UIPlan) -> None:
    """Saves the workspace's result-storage block (what `lmforge run` saves first) before any run can.

    Prefect creates its encryption key with the first block a server stores: on a fresh PostgreSQL,
    two runs starting at once both try, and one fails on the key's unique constraint (Prefect 3.9).
    """
    os.environ["PREFECT_API_URL"] = plan.prefect_api_url     # read when prefect is first imported, just below
    from flows.pipeline import result_storage

    result_storage(plan.ws)


def other_machines_hint(plan: UIPlan) -> str:
    """The two variables a run on another machine sets (no shared workspace, so no ui.json there)."""
    name = socket.getfqdn() if plan.host in ("0.0.0.0", "::") else plan.host
    hint = f"other machines: PREFECT_API_URL=http://{name}:{plan.prefect_port}/api " \
           f"MLFLOW_TRACKING_URI=http://{name}:{plan.mlflow_port} lmforge run ..."
    return hint + ("   (they need --host 0.0.0.0 here)" if plan.host.startswith("127.") else "")


def wait_until_ready(plan: UIPlan, procs: dict[str, subprocess.Popen]) -> None:
    """Returns once both servers answer their health checks; UIError if one exits or time runs out."""
    checks = {"prefect": f"{plan.prefect_api_url}/health", "mlflow": f"{plan.mlflow_url}/health"}
    deadline = time.time() + READY_TIMEOUT_S
    waiting = set(checks)
    while waiting and time.time() < deadline:
        for name in sorted(waiting):
            if procs[name].poll() is not None:
                raise UIError(f"the {name} server exited ({procs[name].returncode}) before answering on "
                              f"{checks[name]} (its output is above)")
            if answers(checks[name]):
                waiting.discard(name)
        time.sleep(0.5)
    if waiting:
        raise UIError(f"{' and '.join(sorted(waiting))} did not answer within {READY_TIMEOUT_S} s")


def answers(url: str, timeout_s: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, ValueError):    # ValueError: not a URL urllib can open
        return False


def stop(procs: dict[str, subprocess.Popen]) -> None:
    """Terminate, then kill what has not exited after 30 s."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def attached_prefect_api(ws_root: Path, timeout_s: float = 3.0) -> str | None:
    """The Prefect API of a `lmforge ui` running for this workspace, if it answers right now."""
    url = read_ui_record(ws_root).get("prefect_api_url")
    return url if url and answers(f"{url}/health", timeout_s) else None


def mlflow_ui_url(ws_root: Path) -> str:
    """Where the MLflow UI of this workspace is: the server `MLFLOW_TRACKING_URI` names, else the one
    ui.json records, else `lmforge ui`'s default address."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return read_ui_record(ws_root).get("mlflow_url", "http://127.0.0.1:5000")


def check_tracking_server(ws_root: Path) -> None:
    """Raises UIError when ui.json sends runs to an MLflow server (PostgreSQL-backed ui) that does not answer."""
    from storage.tracking import shared_tracking_server

    server = None if os.environ.get("MLFLOW_TRACKING_URI") else shared_tracking_server(ws_root)
    if server and not answers(f"{server}/health"):
        raise UIError(f"{ws_root / UI_FILE} sends runs to the MLflow server at {server}, which does not answer: "
                      "start `lmforge ui --backend ...` again (or remove that file to log to the workspace's sqlite)")


def attach(ws_root: Path) -> str | None:
    """Points Prefect at the workspace's running UI server, unless `PREFECT_API_URL` already says where.

    Raises UIError when the workspace's PostgreSQL-backed ui is gone (see `check_tracking_server`).
    """
    check_tracking_server(ws_root)
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    url = attached_prefect_api(ws_root)
    if url:
        os.environ["PREFECT_API_URL"] = url
    return url
