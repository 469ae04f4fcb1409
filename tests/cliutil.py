"""What tests share besides fixtures: where the checkout and the real data are, running the CLI,
writing recipes, reading the catalog, free loopback ports and polling.

Imported by name (`from cliutil import run_cli`), never through `conftest`: with a second
`conftest.py` in the tree (tests/kernels), which module `conftest` means depends on collection order.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()


def run_cli(args: list[str], cwd: Path = REPO_ROOT, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """`lmforge ARGS` in a fresh process, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))   # JSON is YAML
    return path


def catalog_rows(ws: Path, sql: str) -> list[tuple]:
    """Rows of a query on the workspace's catalog (with the output views, as `lmforge catalog` has them)."""
    from flows.stages import catalog_views
    from storage.catalog import Catalog

    return Catalog(ws / "catalog.duckdb").query(sql, catalog_views())[1]


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float = 240.0, what: str = "condition") -> Any:
    """Polls `condition` once a second until it returns something true, and returns that."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def read_artifact(key: str, description_prefix: str | tuple[str, ...] = "") -> tuple[str, object]:
    """The newest Prefect artifact under `key` whose description starts with `description_prefix`.

    One Prefect server serves the whole test session, so other tests publish under the same keys.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                          sort=ArtifactSort.CREATED_DESC)
    ours = [a for a in artifacts if (a.description or "").startswith(description_prefix)]
    assert ours, f"no Prefect artifact {key!r} described as {description_prefix!r}"
    data = ours[0].data
    return ours[0].type, json.loads(data) if ours[0].type == "table" and isinstance(data, str) else data
