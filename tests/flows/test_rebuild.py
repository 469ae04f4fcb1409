"""A cron rebuild: new or changed input files rebuild from ingest on; a night with none finds every stage cached.

File sources enter ingest's fingerprint by path, size and mtime (`tasks.ingest.external_inputs`), so
the plan (`flows.plan.make_plan`) of an unchanged crawl folder is all cached, and one new or
rewritten file makes ingest, and so every later stage, pending.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flows.plan import CACHED, NOT_IN_RECIPE, PENDING, make_plan
from flows.recipe import load_recipe
from flows.stages import catalog_views
from storage.catalog import Catalog
from storage.workspace import Workspace


def plan(recipe: Path, ws: Path) -> dict[str, tuple[str, str]]:
    """stage -> (status, fingerprint) for the recipe's stages, as `lmforge plan` computes them."""
    return {stage.name: (stage.status, stage.fingerprint) for stage in make_plan(load_recipe(recipe), Workspace(ws))
            if stage.status != NOT_IN_RECIPE}


def statuses(recipe: Path, ws: Path) -> dict[str, str]:
    return {name: status for name, (status, _) in plan(recipe, ws).items()}


def crawl_folder(root: Path, shared_data: Path) -> Path:
    """Real Dolma CCNet records split into two crawl files, as a nightly crawl would leave them."""
    lines = (shared_data / "raw" / "dolma_ccnet_cc_en_head-0091.jsonl").read_text().splitlines(keepends=True)
    crawl = root / "crawl"
    crawl.mkdir()
    (crawl / "part-0.jsonl").write_text("".join(lines[:4]))
    (crawl / "part-1.jsonl").write_text("".join(lines[4:8]))
    (root / "later.jsonl").write_text("".join(lines[8:]))           # tomorrow's crawl file
    return crawl


def stage_runs(ws: Path) -> list[tuple]:
    sql = "select run_id, stage, cached from stage_runs order by started_at"
    return Catalog(ws / "catalog.duckdb").query(sql, catalog_views())[1]


def ingested(ws: Path, fingerprint: str) -> int:
    """Documents the ingest output of `fingerprint` holds."""
    return Workspace(ws).read_success("ingest", fingerprint)["stats"]["docs_out"]


@pytest.mark.slow      # three `lmforge run`s (~60 s), besides the session's Prefect server
def test_a_cron_rebuild_rebuilds_from_ingest_only_when_input_files_change(tmp_path, shared_data, cli):
    crawl = crawl_folder(tmp_path, shared_data)
    recipe = tmp_path / "nightly.yaml"
    recipe.write_text(json.dumps({"name": "nightly", "ingest": {"sources": [
        {"name": "crawl", "kind": "jsonl", "paths": [str(crawl / "*.jsonl")]}]},
        "tokenizer": {"vocab_size": 300, "heldout_docs": 0}, "shard": {"val_fraction": 0.1}}))
    ws = tmp_path / "ws"
    stages = ["ingest", "tokenizer", "shard"]
    assert statuses(recipe, ws) == dict.fromkeys(stages, PENDING)
    first = cli(["run", str(recipe), "-w", str(ws)])
    assert first.returncode == 0, first.stderr[-3000:]
    built = plan(recipe, ws)
    assert statuses(recipe, ws) == dict.fromkeys(stages, CACHED)

    # A night without new files: the rebuild runs and reuses every stage.
    quiet = cli(["run", str(recipe), "-w", str(ws)])
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    runs = stage_runs(ws)
    assert [(stage, cached) for _, stage, cached in runs[3:]] == [(stage, True) for stage in stages]
    assert plan(recipe, ws) == built

    # A new crawl file arrives: ingest is pending, and every later stage with it.
    os.replace(tmp_path / "later.jsonl", crawl / "part-2.jsonl")
    grown = plan(recipe, ws)
    assert {name: status for name, (status, _) in grown.items()} == dict.fromkeys(stages, PENDING)
    assert all(grown[name][1] != built[name][1] for name in stages)          # new fingerprints, nothing overwritten
    rebuild = cli(["run", str(recipe), "-w", str(ws)])
    assert rebuild.returncode == 0, rebuild.stderr[-3000:]
    assert [(stage, cached) for _, stage, cached in stage_runs(ws)[6:]] == [(stage, False) for stage in stages]
    assert statuses(recipe, ws) == dict.fromkeys(stages, CACHED)
    assert ingested(ws, built["ingest"][1]) == 8 and ingested(ws, grown["ingest"][1]) == 10

    # A file rewritten in place (same name, new content) is a change too.
    part = crawl / "part-0.jsonl"
    part.write_text(part.read_text().splitlines(keepends=True)[0])
    assert statuses(recipe, ws)["ingest"] == PENDING
