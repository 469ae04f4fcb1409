"""The ablation flow: every (variant, seed) of a grid as a pipeline run, then the comparison table.

With `max_parallel` 1 the variants run one after another as sub-flows of this flow (one process, one
Prefect flow tree). With more, each runs as its own `lmforge run` process on the variant's recipe
file, at most `max_parallel` at a time; the stage locks make variants that share a stage build it
once, whichever process gets there first.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect import flow

from flows.ablation import Grid, Variant, expand, write_variant_recipes
from flows.compare import compare_grid, publish_comparison
from flows.pipeline import pipeline
from storage.stage import StageError
from storage.workspace import Workspace

@flow(name="lmforge-ablation", flow_run_name="{grid.name}", log_prints=True)
def ablation(grid: Grid, workspace: str = "./workspace", max_parallel: int = 1) -> list[dict[str, Any]]:
    """Runs every variant of `grid` (reusing whatever is built), then writes and publishes the comparison."""
    ws = Workspace.at(workspace)
    variants = expand(grid)
    recipes = write_variant_recipes(grid, variants, ws)
    if max_parallel <= 1:
        for variant in variants:
            print(f"== {grid.name}: {variant.label}")
            pipeline(config=variant.config, workspace=str(ws.root))
    else:
        run_in_processes(variants, recipes, ws, max_parallel)
    table = compare_grid(ws, grid.name)
    publish_comparison(ws, grid.name, table)
    publish_dashboard(ws, grid.name)
    return table.rows


def publish_dashboard(ws: Workspace, grid: str) -> None:
    """The grid's dashboard page, logged to every variant's MLflow parent run and linked from this flow run."""
    from dashboards.build import publish

    print(f"dashboard: {publish(ws, grid)}")


def run_in_processes(variants: list[Variant], recipes: dict[str, Path], ws: Workspace, max_parallel: int) -> None:
    """`lmforge run <variant recipe>` per variant, `max_parallel` at a time; fails naming every failed variant.

    Stopped itself (SIGTERM, Ctrl-C), it starts no further variant and stops the running ones with SIGTERM, so
    they end KILLED too instead of running on unwatched.
    """
    env = {**os.environ, "PREFECT_API_URL": os.environ.get("PREFECT_API_URL") or _current_api_url()}
    children = Children()
    with ThreadPoolExecutor(max_parallel) as pool:
        futures = [pool.submit(_run_variant, recipes[v.label], ws, env, children) for v in variants]
        try:
            codes = [future.result() for future in futures]
        except BaseException:
            children.stop()
            raise
    failed = [f"{v.label} (exit {code}; log: {recipes[v.label].with_suffix('.log')})"
              for v, code in zip(variants, codes) if code != 0]
    if failed:
        raise StageError(f"{len(failed)} of {len(variants)} variants failed: {', '.join(failed)}")


class Children:
    """The variant processes running now; once stopped, none starts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self._stopped = False

    def start(self, command: list[str], **kwargs: Any) -> subprocess.Popen | None:
        with self._lock:
            if self._stopped:
                return None
            proc = subprocess.Popen(command, **kwargs)
            self._running.add(proc)
            return proc

    def finished(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._running.discard(proc)

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM to every running variant (each records itself KILLED), SIGKILL after `grace_s`."""
        with self._lock:
            self._stopped = True
            running = list(self._running)
        for proc in running:
            proc.terminate()
        for proc in running:
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()


def _run_variant(recipe: Path, ws: Workspace, env: dict[str, str], children: Children) -> int:
    command = [sys.executable, "-m", "flows.cli", "run", str(recipe), "-w", str(ws.root)]
    with open(recipe.with_suffix(".log"), "w") as log:
        # the user's working directory: recipe paths are relative to it
        proc = children.start(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc is None:
            return -signal.SIGTERM        # the grid was stopped before this variant started
        try:
            return proc.wait()
        finally:
            children.finished(proc)


def _current_api_url() -> str:
    """The Prefect API this flow talks to (the temporary server, when none is configured)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")
