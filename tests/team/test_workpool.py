"""README "Running as a team", step 3: `lmforge serve --pool` and a real Prefect process worker.

The deployments go to a work pool on the session's Prefect server; a `prefect worker start` process,
started here in a directory of its own (not the checkout), picks their runs up. The flows come from
the installed lmforge (module-path entrypoints), not from any directory's files.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cliutil import catalog_rows, run_cli, wait_for, write_recipe


POOL = f"lmforge-test-{uuid.uuid4().hex[:8]}"      # one Prefect server serves the whole test session
RECIPE = "workpool-nightly"
PREFECT = str(Path(sys.executable).parent / "prefect")


def pool_deployments(pool: str) -> dict[str, Any]:
    """'flow/deployment' -> the deployment, for every deployment attached to the work pool."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()
                if d.work_pool_name == pool}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """Where `lmforge serve` runs: a scheduled ingest-only recipe whose input path is relative to it, and a grid."""
    root = tmp_path_factory.mktemp("project")
    (root / "data").symlink_to(shared_data / "raw")         # a relative path resolves here, as under `lmforge run`
    write_recipe(root / "nightly.yaml", {
        "name": RECIPE, "schedule": {"cron": "0 3 * * *", "timezone": "UTC"},
        "ingest": {"sources": [{"name": "dolma", "kind": "jsonl", "paths": ["data/dolma_ccnet_cc_en_head-0091.jsonl"]}]}})
    write_recipe(root / "grid.yaml", {"name": "workpool-grid", "base": "nightly.yaml",
                                      "variants": {"all": {}, "dolma5": {"ingest.sources.0.max_docs": 5}}})
    return root


@pytest.fixture(scope="module")
def served(project: Path, prefect_api: str) -> tuple[Path, str]:
    """`lmforge serve nightly.yaml --pool POOL` run once, as the README says: (workspace, its output)."""
    out = run_cli(["serve", "nightly.yaml", "--pool", POOL], cwd=project)
    assert out.returncode == 0, out.stderr[-3000:]
    return project / "workspace", out.stdout


@pytest.fixture(scope="module")
def worker(served: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A real `prefect worker start --pool POOL` (a process worker: the pool's type), in an empty directory."""
    command = [PREFECT, "worker", "start", "--pool", POOL]
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(command, cwd=log.parent, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1"})
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        print(log.read_text()[-3000:])        # shown by pytest when a test of this module failed


def read_flow_run(flow_run_id: str) -> Any:
    """The flow run as the Prefect server has it now."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def finished_run(deployment: str, parameters: dict[str, Any], timeout: float = 240) -> Any:
    """Starts a run of `deployment` like the UI's Run button (custom run) does, and waits until a worker finished it."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=parameters, timeout=0)    # scheduled now; a worker must take it
    return wait_for(lambda: (r := read_flow_run(run.id)).state.is_final() and r, timeout,
                    f"a worker to finish a run of {deployment}")


def test_serve_pool_deploys_to_a_process_pool_and_a_rerun_updates(served: tuple[Path, str], project: Path) -> None:
    from prefect.client.orchestration import get_client

    _, output = served
    assert f"created work pool '{POOL}' (type process)" in output
    assert f"prefect worker start --pool {POOL}" in output
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(POOL).type == "process"
    again = run_cli(["serve", "nightly.yaml", "--pool", POOL], cwd=project)
    assert again.returncode == 0 and "created work pool" not in again.stdout, again.stderr[-3000:]
    found = pool_deployments(POOL)
    assert sorted(found) == [f"lmforge-pipeline/{RECIPE}", f"lmforge-stage/{RECIPE}"]     # updated, not duplicated
    pipeline = found[f"lmforge-pipeline/{RECIPE}"]
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in pipeline.schedules] == \
        [("0 3 * * *", "UTC", True)]
    assert pipeline.entrypoint == "flows.pipeline.pipeline" and not pipeline.pull_steps    # the installed package
    assert pipeline.job_variables == {"working_dir": str(project)}
    assert found[f"lmforge-stage/{RECIPE}"].parameters["stage"] == "ingest"
    # the recipe's `schedule:` removed, served again: the nightly runs stop (Prefect alone would keep the cron)
    recipe = json.loads((project / "nightly.yaml").read_text())
    write_recipe(project / "unscheduled.yaml", {k: v for k, v in recipe.items() if k != "schedule"})
    unscheduled = run_cli(["serve", "unscheduled.yaml", "--pool", POOL], cwd=project)
    assert unscheduled.returncode == 0, unscheduled.stderr[-3000:]
    assert pool_deployments(POOL)[f"lmforge-pipeline/{RECIPE}"].schedules == []


def test_a_worker_runs_the_pipeline_and_a_one_stage_rerun(served: tuple[Path, str], worker: None,
                                                           tmp_path: Path) -> None:
    ws, _ = served
    out = subprocess.run([PREFECT, "deployment", "run", f"lmforge-pipeline/{RECIPE}", "--watch"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "finished successfully" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    run = read_flow_run(re.search(r"UUID: (\S+)", out.stdout).group(1))
    assert run.work_pool_name == POOL and run.state.is_completed()
    assert catalog_rows(ws, "select stage, status, cached from stage_runs") == [("ingest", "finished", False)]
    [(pid, flow_run_id)] = catalog_rows(ws, "select pid, prefect_flow_run_id from pipeline_runs")
    assert flow_run_id == str(run.id) and run.infrastructure_pid == str(pid)   # the worker's flow-run process ran it
    # the UI's custom run: the deployment's default (force) overridden, so this run must reuse the output
    rerun = finished_run(f"lmforge-stage/{RECIPE}", {"stage": "ingest", "force": False})
    assert rerun.state.is_completed() and rerun.work_pool_name == POOL and rerun.infrastructure_pid, rerun.state
    assert catalog_rows(ws, "select cached, count(*) from stage_runs group by all order by all") == \
        [(False, 1), (True, 1)]


def test_serve_pool_deploys_a_grid_as_an_ablation_deployment(served: tuple[Path, str], project: Path) -> None:
    out = run_cli(["serve", "grid.yaml", "--pool", POOL], cwd=project)
    assert out.returncode == 0, out.stderr[-3000:]
    ablation = pool_deployments(POOL)["lmforge-ablation/workpool-grid"]
    assert ablation.entrypoint == "flows.ablate.ablation"
    assert sorted(ablation.parameters["grid"]["variants"]) == ["all", "dolma5"]


def test_serve_pool_without_a_prefect_server_says_what_to_set(project: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "nightly.yaml", "--pool", POOL,
                          "-w", str(tmp_path / "ws")], cwd=project, capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 2 and "set PREFECT_API_URL" in out.stderr, out.stderr[-3000:]
