"""Ablation grids: variants expand to recipes, share stages, run once, and compare in one table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from cliutil import catalog_rows, write_recipe

from flows.ablation import expand, load_grid, plan_grid
from flows.recipe import RecipeError
from storage.workspace import Workspace


@pytest.fixture
def grid(tmp_path: Path, shared_data: Path) -> Path:
    base = write_recipe(tmp_path / "base.yaml", {"name": "base", "ingest": {"sources": [
        {"name": "dolma", "kind": "jsonl", "paths": [str(shared_data / "raw/dolma_ccnet_cc_en_head-0091.jsonl")]},
        {"name": "cc", "kind": "warc", "paths": [str(shared_data / "raw/*.warc.gz")]}]},
        "tokenizer": {"vocab_size": 300, "heldout_docs": 2}, "shard": {"val_fraction": 0.1}})
    return write_recipe(tmp_path / "grid.yaml", {
        "name": "tiny", "base": str(base),
        "overrides": {"tokenizer": {"from_recipe": str(base)}},      # one tokenizer for every variant
        "variants": {"full": {}, "dolma5": {"ingest.sources.0.max_docs": 5}, "no_shard": {"shard": None}}})


def test_variants_expand_to_recipes_named_and_tagged(grid: Path) -> None:
    variants = expand(load_grid(grid))
    assert [v.config.name for v in variants] == ["tiny-full", "tiny-dolma5", "tiny-no_shard"]
    dolma5 = variants[1].config
    assert dolma5.ingest.sources[0].max_docs == 5 and dolma5.ablation.variant == "dolma5"
    assert dolma5.ablation.overrides == {"tokenizer": {"from_recipe": str(grid.parent / "base.yaml")},
                                         "ingest.sources.0.max_docs": 5}
    assert variants[2].config.shard is None and variants[2].config.enabled_stages() == ["ingest", "tokenizer"]


def test_seeds_multiply_variants_and_bad_grids_name_the_problem(grid: Path, tmp_path: Path) -> None:
    data = json.loads(grid.read_text())
    seeded = write_recipe(tmp_path / "seeded.yaml", {**data, "seeds": [1, 2]})
    assert [(v.name, v.seed, v.config.name) for v in expand(load_grid(seeded))][:2] == \
        [("full", 1, "tiny-full-s1"), ("full", 2, "tiny-full-s2")]
    bad = write_recipe(tmp_path / "bad.yaml", {**data, "variants": {"oops": {"shard.val_fraction": 2}}})
    with pytest.raises(RecipeError, match=r"variant oops.*shard.val_fraction: Input should be less than 1"):
        expand(load_grid(bad))
    with pytest.raises(RecipeError, match="seeds must be a non-empty list of distinct integers"):
        load_grid(write_recipe(tmp_path / "dup.yaml", {**data, "seeds": [1, 1]}))


def test_a_grid_whose_base_or_variant_is_broken_stops_ablate_before_any_work(grid: Path, tmp_path: Path) -> None:
    from cliutil import run_cli

    data = json.loads(grid.read_text())
    no_base = write_recipe(tmp_path / "no_base.yaml", {**data, "base": str(tmp_path / "gone.yaml")})
    with pytest.raises(RecipeError, match=rf"^grid tiny: base: {tmp_path / 'gone.yaml'}: cannot read recipe"):
        expand(load_grid(no_base))
    typo = write_recipe(tmp_path / "typo.yaml", {**data, "variants": {"oops": {"shard.val_fractio": 0.2}}})
    for bad, message in [(no_base, "grid tiny: base: "), (typo, "variant oops): shard.val_fractio: unknown key")]:
        out = run_cli(["ablate", str(bad), "-w", str(tmp_path / "ws")])
        assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
        assert len(out.stderr.splitlines()) == 1 and not (tmp_path / "ws").exists()


def test_a_grid_and_a_recipe_given_to_the_wrong_command_are_named_so(grid: Path, tmp_path: Path) -> None:
    from cliutil import run_cli

    base = str(grid.parent / "base.yaml")
    for args, message in [
            (["run", str(grid)], f"error: {grid} is an ablation grid (it has `variants`): run it with `lmforge ablate"),
            (["plan", str(grid), "--set", "seed=3"], "error: --set applies to a recipe;"),   # it was ignored
            (["ablate", base], f"error: {base} is not an ablation grid (it has no `variants`)")]:
        out = run_cli([*args, "-w", str(tmp_path / "ws")])
        assert out.returncode == 2 and out.stderr.startswith(message), out.stderr[-2000:]
    assert not (tmp_path / "ws").exists()


def test_a_variant_cannot_silently_drop_an_override_the_grid_sets_for_every_variant(grid: Path, tmp_path: Path) -> None:
    data = {**json.loads(grid.read_text()), "overrides": {"shard.val_fraction": 0.2}}
    whole = write_recipe(tmp_path / "whole.yaml", {**data, "variants": {"own_shard": {"shard": {"mixture": None}}}})
    with pytest.raises(RecipeError, match=r"variant own_shard: 'shard' replaces the whole section, which drops the "
                                          r"grid's overrides \['shard.val_fraction'\]"):
        expand(load_grid(whole))
    kept = write_recipe(tmp_path / "kept.yaml", {**data, "variants": {"off": {"shard": None}, "field": {
        "shard.val_fraction": 0.3}}})
    off, field = (v.config for v in expand(load_grid(kept)))
    assert off.shard is None and field.shard.val_fraction == 0.3     # off, or one field changed on purpose


def test_the_grid_plan_shows_which_variants_share_each_output(grid: Path, tmp_path: Path) -> None:
    rows = plan_grid(expand(load_grid(grid)), Workspace(tmp_path / "ws"))
    by = {(r.variant.split("/")[0], r.stage): r for r in rows}
    tokenizers = {by[(v, "tokenizer")].fingerprint for v in ("full", "dolma5", "no_shard")}
    assert len(tokenizers) == 1                                  # independent of each variant's documents
    assert by[("full", "ingest")].shared_with == ("no_shard/seed=1337",)
    assert by[("dolma5", "ingest")].shared_with == ()
    assert by[("full", "shard")].fingerprint != by[("dolma5", "shard")].fingerprint
    assert all(r.status == "pending" for r in rows)


def test_a_grid_runs_in_parallel_builds_each_output_once_and_compares(grid: Path, tmp_path: Path, cli,
                                                                     mlflow_server: str) -> None:
    ws = tmp_path / "ws"
    out = cli(["ablate", str(grid), "-w", str(ws), "--max-parallel", "2"], env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tiny: 3 variants" in out.stdout and "shard/tokens_train" in out.stdout
    built = catalog_rows(ws, "select stage, fingerprint, count(*) from stage_runs where not cached group by all")
    assert all(count == 1 for _, _, count in built) and len(built) == 5   # 2 ingests, 1 tokenizer, 2 shards
    assert sorted(catalog_rows(ws, "select variant from ablations where grid = 'tiny'")) == \
        [("dolma5",), ("full",), ("no_shard",)]
    rows = json.loads(cli(["compare", "tiny", "-w", str(ws), "--format", "json"]).stdout)
    docs = {r["variant"]: r["mean"] for r in rows if r["metric"] == "ingest/docs_out"}
    assert docs == {"full": 48, "dolma5": 43, "no_shard": 48}
    assert (ws / "ablations/tiny/compare.parquet").is_file()
    markdown = cli(["compare", "tiny", "-w", str(ws), "--format", "markdown"]).stdout
    assert markdown.splitlines()[0] == "| metric | full | dolma5 | no_shard |"
    assert_parent_runs_line_up(mlflow_server)


def assert_parent_runs_line_up(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("lmforge").experiment_id
    parents = client.search_runs([experiment], filter_string="tags.`lmforge.ablation` = 'tiny'")
    by_variant = {r.data.tags["lmforge.variant"]: r for r in parents}
    assert set(by_variant) == {"full", "dolma5", "no_shard"}
    dolma5 = by_variant["dolma5"]
    assert dolma5.data.params["override.ingest.sources.0.max_docs"] == "5"
    assert dolma5.data.metrics["ingest/docs_out"] == 43 and "shard/tokens_train" in dolma5.data.metrics
    nested = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{dolma5.info.run_id}'")
    assert sorted(r.data.tags["lmforge.stage"] for r in nested) == ["ingest", "shard", "tokenizer"]
    assert all(r.info.status == "FINISHED" for r in [*parents, *nested])


def test_compare_names_a_grid_that_never_ran(tmp_path: Path, cli) -> None:
    ws = tmp_path / "ws"
    Workspace.at(ws)
    from storage.catalog import Catalog

    Catalog(ws / "catalog.duckdb")
    out = cli(["compare", "nothing", "-w", str(ws)])
    assert out.returncode == 1 and "no finished run of ablation grid 'nothing'" in out.stderr


def test_a_grid_killed_midway_reruns_only_what_is_unfinished(grid: Path, tmp_path: Path, cli) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from cliutil import REPO_ROOT

    ws = tmp_path / "ws"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ablate", str(grid), "-w", str(ws)], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not list(ws.glob("stages/tokenizer/*/_SUCCESS.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)                       # mid-grid: some stages built, others not
    proc.wait()
    done_before = {p.parent for p in ws.glob("stages/*/*/_SUCCESS.json")}
    assert done_before, "the grid was killed before it built anything"
    again = cli(["ablate", str(grid), "-w", str(ws)])
    assert again.returncode == 0, again.stderr[-3000:]
    built_twice = catalog_rows(ws, "select stage, fingerprint from stage_runs where not cached and status = 'finished' "
                                   "group by all having count(*) > 1")
    assert built_twice == []                                  # what the killed run finished was reused
    assert catalog_rows(ws, "select count(*) from pipeline_runs where status = 'running'") == [(0,)]
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    assert "RUNNING" not in {r.info.status for r in runs} and "KILLED" in {r.info.status for r in runs}


def test_two_ablate_processes_of_one_grid_at_once_both_finish_and_build_every_stage_once(grid: Path,
                                                                                       tmp_path: Path,
                                                                                       prefect_api: str) -> None:
    import subprocess
    import sys

    from cliutil import REPO_ROOT

    ws = tmp_path / "ws"
    command = [sys.executable, "-m", "flows.cli", "ablate", str(grid), "-w", str(ws)]
    procs = [subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-3000:]
    built = catalog_rows(ws, "select stage, fingerprint, count(*) from stage_runs where not cached group by all")
    assert len(built) == 5 and all(count == 1 for _, _, count in built)
    assert catalog_rows(ws, "select count(*) from ablations") == [(6,)]      # 3 variants, twice


def test_sigterm_to_a_parallel_ablate_stops_its_variants_and_starts_no_more(tmp_path: Path, shared_data: Path,
                                                                            prefect_api: str) -> None:
    """`kill <ablate pid>` (Slurm, Prefect cancel, systemd) signals the parent only: its variant processes end
    KILLED with it, instead of running on and finishing, and no queued variant starts."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from cliutil import REPO_ROOT
    from test_cli import big_jsonl

    base = write_recipe(tmp_path / "base.yaml", {"name": "base", "ingest": {"sources": [
        {"name": "plays", "kind": "jsonl", "paths": [str(big_jsonl(tmp_path / "big.jsonl", shared_data, 20))]}]}})
    grid = write_recipe(tmp_path / "grid.yaml", {"name": "stop", "base": str(base), "variants": {
        "a": {}, "b": {"ingest.sources.0.max_doc_chars": 100000}, "c": {"ingest.sources.0.max_doc_chars": 200000}}})
    ws = tmp_path / "ws"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ablate", str(grid), "-w", str(ws), "--max-parallel",
                             "2"], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(ws.glob("stages/ingest/*.tmp-*/*/part-*.parquet")) and time.time() < deadline:
        assert proc.poll() is None, "ablate ended before its variants wrote anything"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) != 0
    runs = catalog_rows(ws, "select a.variant, p.status, p.pid from pipeline_runs p join ablations a using (run_id)")
    assert runs and {status for _, status, _ in runs} == {"killed"}, runs
    assert "c" not in {variant for variant, _, _ in runs}            # the queued variant never started
    for _, _, pid in runs:
        try:
            os.kill(pid, 0)
            raise AssertionError(f"variant process {pid} still runs")
        except ProcessLookupError:
            pass
    assert not list(ws.glob("stages/ingest/*/_SUCCESS.json"))


def test_compare_and_the_dashboard_show_only_the_variants_and_seeds_the_grid_has_now(grid: Path, tmp_path: Path) -> None:
    """A variant removed from the grid, or a seed dropped, must not stay in the table, the mean ± std or the
    dashboard's verdict once the grid is ablated again."""
    from dashboards.queries import select
    from flows.ablation import write_variant_recipes
    from flows.compare import compare_grid
    from storage.catalog import Catalog, utcnow

    ws = Workspace.at(tmp_path / "ws")
    catalog = Catalog(ws.catalog_path)
    earlier = [("full", 1337, 48), ("full", 7, 30), ("renamed_since", 1337, 99), ("dolma5", 1337, 43)]
    for position, (variant, seed, docs) in enumerate(earlier):
        run_id, fingerprint = f"run{position}", f"fp{position}"
        catalog.start_pipeline(run_id, f"tiny-{variant}", 1, "{}", None, None)
        catalog.record_ablation("tiny", variant, position, seed, run_id)
        catalog.record_stage({"run_id": run_id, "stage": "ingest", "fingerprint": fingerprint, "status": "finished",
                              "cached": False, "started_at": utcnow(), "output_dir": str(ws.root / fingerprint)})
        catalog.record_stats(fingerprint, "ingest", {"docs_out": docs})
        catalog.finish_pipeline(run_id, "finished")
    assert compare_grid(ws, "tiny").variants == ["full", "renamed_since", "dolma5"]   # nothing says what the grid is
    write_variant_recipes(load_grid(grid), expand(load_grid(grid)), ws)   # now: full, dolma5, no_shard; seed 1337
    table = compare_grid(ws, "tiny")
    assert table.variants == ["full", "dolma5"]
    assert {(r["variant"], r["mean"], r["seeds"]) for r in table.rows} == {("full", 48, 1), ("dolma5", 43, 1)}
    assert [(run.variant, run.seed) for run in select(ws, "tiny").runs] == [("full", 1337), ("dolma5", 1337)]


def test_each_stage_is_the_current_output_across_a_variants_runs() -> None:
    """After partial reruns of one (variant, seed), each stage shows the output its newest run used, or else the
    newest one made from the outputs chosen upstream; never an output made from another upstream, nor a stage
    the recipe no longer has."""
    from flows.compare import Comparison, GridMember, StageOutput, current_outputs, recipe_stages, render

    def out(stage: str, fingerprint: str, run: str, *inputs: str) -> StageOutput:
        return StageOutput(stage, fingerprint, run, None, False, 0.0, "", None, inputs)

    def chosen(runs: list[list[StageOutput]], stages: set[str] | None = None) -> list[tuple[str, str, str]]:
        return [(o.stage, o.fingerprint, o.run_id) for o in current_outputs(runs, stages)]

    full = [out("ingest", "I1", "r1"), out("tokenizer", "T1", "r1", "base-docs"), out("shard", "S1", "r1", "I1", "T1"),
            out("pretrain", "P1", "r1", "S1", "T1"), out("finetune", "F1", "r1", "P1", "T1"),
            out("evaluate", "E1", "r1", "P1", "T1")]
    # --only evaluate (a changed task): the new evaluate, every other stage from the full run
    assert chosen([[out("evaluate", "E2", "r2", "P1", "T1")], full]) == \
        [("ingest", "I1", "r1"), ("tokenizer", "T1", "r1"), ("shard", "S1", "r1"), ("pretrain", "P1", "r1"),
         ("finetune", "F1", "r1"), ("evaluate", "E2", "r2")]
    # --until pretrain with a new model: the old finetune and evaluate scored another model
    until = [out("ingest", "I1", "r2"), out("tokenizer", "T1", "r2", "base-docs"), out("shard", "S1", "r2", "I1", "T1"),
             out("pretrain", "P2", "r2", "S1", "T1")]
    assert [stage for stage, _, _ in chosen([until, full])] == ["ingest", "tokenizer", "shard", "pretrain"]
    recipe = json.dumps({stage: {} for stage in ("ingest", "tokenizer", "shard", "pretrain", "finetune", "evaluate")})
    member = GridMember("v", 1, 0, "r2", None, recipe, current_outputs([until, full], recipe_stages(recipe)))
    assert member.missing == ["finetune", "evaluate"]          # said under the table, not only a seed fewer
    assert "v seed 1: no current finetune, evaluate output" in render(Comparison("g", ["v"], [], {}, [member]), "table")
    # --only ingest: the tokenizer, borrowed from another recipe, was trained on documents this variant never recorded
    assert chosen([[out("ingest", "I1", "r2")], full])[1:] == [(o.stage, o.fingerprint, "r1") for o in full[1:]]
    # a shard built since (--only shard with other values) is not what the newest run's evaluate was made from
    assert ("shard", "S1", "r1") in chosen([[out("evaluate", "E2", "r3", "P1", "T1")],
                                             [out("shard", "S2", "r2", "I1", "T1")], full])
    # a stage the recipe no longer has (curate turned off) stays out, though its input is still current
    curated = [out("ingest", "I1", "r1"), out("curate", "C1", "r1", "I1"), out("shard", "S1", "r1", "C1")]
    raw = [out("ingest", "I1", "r2"), out("shard", "S3", "r2", "I1")]
    assert chosen([raw, curated], {"ingest", "shard"}) == [("ingest", "I1", "r2"), ("shard", "S3", "r2")]


def test_a_stage_made_from_an_output_rebuilt_since_is_not_current(tmp_path: Path) -> None:
    """`--force pretrain --only pretrain` keeps pretrain's fingerprint; if its bytes changed, the variant's earlier
    evaluate scored the old model: it is not shown (and is named missing), as the pipeline would rebuild it."""
    from flows.compare import grid_members
    from storage.catalog import Catalog, utcnow

    ws = Workspace.at(tmp_path / "ws")
    catalog = Catalog(ws.catalog_path)
    recipe = json.dumps({"name": "tiny-full", "ingest": {}, "pretrain": {}, "evaluate": {}})

    def success(stage: str, fingerprint: str, digest: str, **inputs: str) -> None:
        ws.stage_dir(stage, fingerprint).mkdir(parents=True, exist_ok=True)
        (ws.stage_dir(stage, fingerprint) / "_SUCCESS.json").write_text(json.dumps(
            {"output_digest": digest, "input_digests": inputs}))

    def record(run_id: str, stages: list[tuple[str, str, dict[str, str]]]) -> None:
        catalog.start_pipeline(run_id, "tiny-full", 1, recipe, None, None)
        catalog.record_ablation("tiny", "full", 0, 1337, run_id)
        for stage, fingerprint, inputs in stages:
            catalog.record_stage({"run_id": run_id, "stage": stage, "fingerprint": fingerprint, "status": "finished",
                                  "cached": False, "started_at": utcnow(), "input_fingerprints": json.dumps(inputs),
                                  "output_dir": str(ws.stage_dir(stage, fingerprint))})
        catalog.finish_pipeline(run_id, "finished")

    success("ingest", "I1", "i")
    success("pretrain", "P1", "p-old", documents="i")
    success("evaluate", "E1", "e", model="p-old")
    record("r1", [("ingest", "I1", {}), ("pretrain", "P1", {"documents": "I1"}), ("evaluate", "E1", {"model": "P1"})])
    record("r2", [("pretrain", "P1", {"documents": "I1"})])
    assert [out.stage for out in grid_members(ws, "tiny")[0].stages] == ["ingest", "pretrain", "evaluate"]
    success("pretrain", "P1", "p-new", documents="i")           # the rebuild wrote other bytes
    member = grid_members(ws, "tiny")[0]
    assert [out.stage for out in member.stages] == ["ingest", "pretrain"] and member.missing == ["evaluate"]
