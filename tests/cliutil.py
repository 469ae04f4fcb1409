"""What tests share besides fixtures: where the checkout and the real data are, and running the CLI.

Imported by name (`from cliutil import run_cli`), never through `conftest`: with a second
`conftest.py` in the tree (tests/kernels), which module `conftest` means depends on collection order.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()


def run_cli(args: list[str], cwd: Path = REPO_ROOT, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """`lmforge ARGS` in a fresh process, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


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
