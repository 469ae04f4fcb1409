"""`lmforge serve` against a real Prefect server: scheduled deployments, runs triggered like the UI's Run button."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cliutil import REPO_ROOT, catalog_rows, wait_for, write_recipe


@pytest.fixture
def nightly(tmp_path: Path, shared_data: Path) -> Path:
    return write_recipe(tmp_path / "nightly.yaml", {
        "name": "nightly-test", "schedule": {"cron": "0 3 * * *", "timezone": "UTC"},
        "ingest": {"sources": [{"name": "dolma", "kind": "jsonl",
                                "paths": [str(shared_data / "raw/dolma_ccnet_cc_en_head-0091.jsonl")]}]}})


def deployments_of(name: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()
                if d.name == name}


def test_serve_registers_scheduled_deployments_that_run_from_the_api(nightly: Path, tmp_path: Path,
                                                                     prefect_api: str) -> None:
    from prefect.deployments import run_deployment

    ws = tmp_path / "ws"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(nightly), "-w", str(ws)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        found = wait_for(lambda: len(deployments_of("nightly-test")) == 2 and deployments_of("nightly-test"),
                         what="the two deployments")
        pipeline = found["lmforge-pipeline/nightly-test"]
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in pipeline.schedules] == \
            [("0 3 * * *", "UTC", True)]
        assert found["lmforge-stage/nightly-test"].parameters["stage"] == "ingest"
        run = run_deployment("lmforge-pipeline/nightly-test", timeout=300)    # what the UI's Run button does
        assert run.state.is_completed(), run.state
        assert catalog_rows(ws, "select stage, status from stage_runs") == [("ingest", "finished")]
        rerun = run_deployment("lmforge-stage/nightly-test", timeout=300)
        assert rerun.state.is_completed(), rerun.state
        assert catalog_rows(ws, "select count(*) from stage_runs where not cached") == [(2,)]   # forced: built again
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    schedules = deployments_of("nightly-test")["lmforge-pipeline/nightly-test"].schedules
    assert all(s.active for s in schedules), output[-2000:]            # stopping serve pauses nothing


def test_a_grid_with_a_broken_variant_is_refused_when_served(tmp_path: Path, nightly: Path) -> None:
    from flows.recipe import RecipeError
    from flows.serve import deployments

    grid = write_recipe(tmp_path / "grid.yaml", {"name": "g", "base": str(nightly),
                                                 "variants": {"ok": {}, "typo": {"ingest.sources.0.max_doc": 5}}})
    with pytest.raises(RecipeError, match=r"variant typo\): ingest.sources.0.jsonl.max_doc: unknown key"):
        deployments([grid], tmp_path / "ws")
