"""Shared fixtures: the real data folder, one Prefect server per test session, CLI subprocess helpers."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cliutil import REPO_ROOT, SHARED_DATA, run_cli  # noqa: F401  (run_cli: the `cli` fixture)

os.environ.update({"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_LOGGING_LEVEL": "WARNING"})
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("LMFORGE_WORKSPACE", None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`: real third-party files (read-only, never copied into the repo)."""
    if not SHARED_DATA.is_dir():
        raise RuntimeError(f"{SHARED_DATA} is missing: the tests read real data from ../shared/data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One temporary Prefect server for the whole session (starting one costs 15-30 s here)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url   # subprocesses (the CLI) use the same server
        yield url
        os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, one worker) on a free loopback port, for the whole session."""
    import socket
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts")]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError(f"mlflow server did not answer on {url} (exit {proc.poll()})")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def cli(prefect_api: str):
    return run_cli
