"""The dashboard, from a workspace a real small grid built: the queries behind each panel, the CLI, and the page
opened in headless Chromium (no console errors, no network, every panel with data draws its points)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from browser import Browser, ensure_chromium
from cliutil import read_artifact, run_cli
from mlflow.tracking import MlflowClient

from dashboards import queries
from dashboards.queries import LossCurve, NothingToShowError, Selection
from dashboards.verdict import Standing, choose_judge, data_facts, standings, why_html
from storage.workspace import Workspace

pytestmark = pytest.mark.slow      # the module's grid: four small pipeline runs (~2 min on 2 cores)
SPECIALS = ["<|endoftext|>", "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"]
PANEL_SCRIPT = """Array.from(document.querySelectorAll('section[data-panel]')).map(s => ({
  key: s.dataset.panel,
  empty: Array.from(s.querySelectorAll('.empty')).map(e => e.textContent),
  rows: s.querySelectorAll('table tr').length,
  charts: Array.from(s.querySelectorAll('.js-plotly-plot')).map(p => ({
    title: (p.layout && p.layout.title && p.layout.title.text) || '',
    points: (p.data || []).reduce((n, t) => n + (t.x || []).length, 0),
    drawn: p.querySelectorAll('g.trace').length,
    width: p.getBoundingClientRect().width}))}))"""


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))     # JSON is YAML
    return path


def base_recipe(root: Path, data: Path) -> Path:
    return write_json(root / "base.yaml", {
        "name": "dashbase", "seed": 1,
        "ingest": {"sources": [
            {"name": "dolma", "kind": "jsonl", "paths": [str(data / "raw/dolma_ccnet_cc_en_head-0091.jsonl")]},
            {"name": "wiki", "kind": "wiki_offline", "languages": ["en", "fr"], "max_docs": 300}]},
        "curate": {"executor": {"tasks": 1, "workers": 1}, "c4_quality": {"min_num_sentences": 2}},
        "dedup": {"executor": {"tasks": 1, "workers": 1}},
        "tokenizer": {"vocab_size": 400, "special_tokens": SPECIALS},
        "shard": {"val_fraction": 0.1},
        "pretrain": {"model": {"preset": "gpt-nano"}, "batch_tokens": 512, "micro_batch": 4, "max_steps": 8,
                     "optim": {"warmup_steps": 2},
                     "eval_every": 4, "checkpoint_every": 8, "log_every": 2, "precision": "fp32",
                     "sample": {"prompts": ["The "], "max_new_tokens": 4}},
        "finetune": {"tasks": [{"name": "sst2", "kind": "glue", "train": str(data / "glue/sst2/train.head5000.tsv"),
                                "eval": str(data / "glue/sst2/dev.tsv"), "max_train_examples": 48,
                                "max_eval_examples": 48, "max_length": 32, "epochs": 1, "batch_size": 16,
                                "sample_efficiency": {"fractions": [0.5, 1.0]}}]},
        "evaluate": {"heldout": {"files": [str(data / "raw/wikitext-2_test.txt")], "max_chars": 20000, "stride": 64},
                     "tasks": [{"name": "arc_easy", "format": "arc", "limit": 12,
                                "path": str(data / "multiple_choice/arc_easy/ARC-Easy-Dev.jsonl")}]}})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, shared_data: Path, prefect_api: str) -> Workspace:
    """A grid (raw vs curated, two seeds each) through `lmforge ablate`, then a run that stops at pretrain."""
    root = tmp_path_factory.mktemp("dashboard")
    base = base_recipe(root, shared_data)
    grid = write_json(root / "grid.yaml", {"name": "dash", "base": str(base), "seeds": [1, 2],
                                           "overrides": {"tokenizer": {"from_recipe": str(base)}},
                                           "variants": {"raw": {"curate": None, "dedup": None}, "curated": {}}})
    ws = root / "ws"
    out = run_cli(["ablate", str(grid), "-w", str(ws)])
    assert out.returncode == 0, out.stderr[-4000:]
    stop = run_cli(["run", str(base), "-w", str(ws), "--until", "pretrain"])
    assert stop.returncode == 0, stop.stderr[-4000:]
    return Workspace(ws)


@pytest.fixture(scope="module")
def grid(built: Workspace) -> Selection:
    return queries.select(built, "dash")


@pytest.fixture(scope="module")
def browser() -> Browser:
    try:
        binary = ensure_chromium()
    except RuntimeError as err:
        pytest.fail(f"the browser test needs Debian's chromium: {err}")
    chromium = Browser(binary)
    yield chromium
    chromium.close()


# ---- the queries behind each panel ---------------------------------------------------------------


def test_the_grid_selection_is_each_variant_and_seed_with_its_stages(grid: Selection, built: Workspace) -> None:
    assert [(r.variant, r.seed) for r in grid.runs] == [("raw", 1), ("raw", 2), ("curated", 1), ("curated", 2)]
    assert grid.variants == ["raw", "curated"]
    raw, curated = grid.runs[0], grid.runs[2]
    assert "curate" not in raw.stages and list(curated.stages) == ["ingest", "curate", "dedup", "tokenizer", "shard",
                                                                   "pretrain", "finetune", "evaluate"]
    assert raw.overrides == {"tokenizer": {"from_recipe": str(built.root.parent / "base.yaml")},
                             "curate": None, "dedup": None}
    with pytest.raises(NothingToShowError, match="no finished ablation grid 'nope'"):
        queries.select(built, "nope")


def test_a_partial_rerun_of_one_variant_updates_its_stage_and_keeps_the_others(built: Workspace, grid: Selection,
                                                                              tmp_path: Path) -> None:
    """`lmforge run <variant recipe> --only evaluate` (here with a changed task limit) records a run with one stage:
    compare and the dashboard must show its new evaluate numbers beside the variant's earlier pretrain and finetune
    numbers, for both seeds, and say which run each stage comes from."""
    import shutil

    from flows.compare import compare_grid, render

    ws = tmp_path / "ws"
    shutil.copytree(built.root, ws)          # the module's workspace stays as the other tests expect it
    recipe = ws / "ablations/dash/dash-curated-s1.json"
    out = run_cli(["run", str(recipe), "-w", str(ws), "--only", "evaluate", "--set", "evaluate.tasks.0.limit=6"],
                  env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert out.returncode == 0, out.stderr[-3000:]
    before, after = grid.runs[2], queries.select(Workspace(ws), "dash").runs[2]
    assert (after.variant, after.seed) == ("curated", 1) and after.run_id != before.run_id
    assert list(after.stages) == list(before.stages)                          # every stage, not only evaluate
    assert after.stages["pretrain"] == before.stages["pretrain"]
    assert after.stages["finetune"].run_id == before.run_id != after.stages["evaluate"].run_id == after.run_id
    evaluate = after.stages["evaluate"]
    assert evaluate.fingerprint != before.stages["evaluate"].fingerprint
    assert evaluate.stats == json.loads((ws / f"stages/evaluate/{evaluate.fingerprint}/_SUCCESS.json").read_text())[
        "stats"]
    table = compare_grid(Workspace(ws), "dash")
    seed2 = grid.runs[3].stages
    assert table.cells[("curated", "pretrain/final_val_loss")].values == \
        [before.stages["pretrain"].stats["final_val_loss"], seed2["pretrain"].stats["final_val_loss"]]
    core = table.cells[("curated", "evaluate/aggregate/core")]
    assert core.values == [evaluate.stats["aggregate/core"], seed2["evaluate"].stats["aggregate/core"]]
    assert core.runs == [after.run_id, grid.runs[3].run_id]
    assert f"finetune from run {before.run_id}; evaluate from run {after.run_id}" in render(table, "table")
    latest = queries.select(Workspace(ws), None).runs[0]          # `lmforge dashboard`: that recipe, not that run
    assert latest.stages == after.stages and latest.run_id == after.run_id


def test_a_seed_whose_evaluate_is_stale_is_named_under_the_verdict(grid: Selection) -> None:
    """A seed rerun `--until pretrain` with another model has no current evaluate: the verdict says it is not scored."""
    from dataclasses import replace

    from dashboards.charts import Palette
    from dashboards.verdict import verdict_html

    runs = list(grid.runs)
    runs[3] = replace(runs[3], stages={k: v for k, v in runs[3].stages.items() if k not in ("finetune", "evaluate")},
                      missing=("finetune", "evaluate"))
    partial = Selection(grid.title, grid.grid, grid.workspace, runs)
    assert "Not scored: curated seed 2 (no current evaluate output" in verdict_html(partial, Palette(partial.variants))
    assert {s.variant: s.seeds for s in standings(partial, choose_judge(partial))} == {"raw": 2, "curated": 1}
    assert "Not scored" not in verdict_html(grid, Palette(grid.variants))


def test_the_latest_run_is_the_one_that_stopped_at_pretrain(built: Workspace) -> None:
    latest = queries.select(built, None)
    assert len(latest.runs) == 1 and latest.grid is None and latest.variants == ["dashbase"]
    assert list(latest.runs[0].stages)[-1] == "pretrain" and not latest.has("evaluate")
    assert all(ref.cached for ref in latest.runs[0].stages.values())     # the grid's curated seed-1 run built it


def test_the_funnel_follows_documents_through_every_step_and_counts_bytes(grid: Selection) -> None:
    steps = queries.funnel(grid)
    raw = [s for s in steps if s.variant == "raw"]
    curated = [s for s in steps if s.variant == "curated"]
    ingest = grid.runs[0].stages["ingest"]
    assert [s.step for s in raw] == ["ingest"] and raw[0].docs == ingest.stats["docs_out"]
    assert [s.step for s in curated if ":" not in s.step] == ["ingest", "curate", "dedup"]
    assert any(s.step.startswith("curate: ") and "language" in s.step for s in curated)
    kept = [s.docs for s in curated]
    assert kept == sorted(kept, reverse=True)                           # a funnel only narrows
    assert curated[-1].docs == grid.runs[2].stages["dedup"].stats["docs_out"]
    assert raw[0].bytes == parquet_text_bytes(ingest.output_dir)
    curate = grid.runs[2].stages["curate"]
    last_step = [s for s in curated if s.step.startswith("curate: ")][-1]
    assert last_step.bytes == parquet_text_bytes(curate.output_dir) > 0     # the byte counters meet the Parquet
    assert all(s.bytes is not None for s in curated) and queries.missing_byte_counters(grid) == []


def parquet_text_bytes(output: Path) -> int:
    files = sorted(p for p in output.rglob("*.parquet") if "excluded" not in p.parts)
    return sum(len(t.encode("utf-8")) for t in pq.read_table(files, columns=["text"]).column("text").to_pylist())


def test_outputs_built_before_byte_counters_still_render_and_say_so(grid: Selection) -> None:
    from dataclasses import replace

    from dashboards.page import build_page

    def without_bytes(run: queries.RunRef) -> queries.RunRef:
        stages = {name: replace(ref, stats={k: v for k, v in ref.stats.items() if "/bytes_" not in k})
                  for name, ref in run.stages.items()}
        return replace(run, stages=stages)

    old = Selection(grid.title, grid.grid, grid.workspace, [without_bytes(run) for run in grid.runs])
    curate = old.runs[2].stages["curate"]
    assert queries.missing_byte_counters(old)[0] == f"curate {curate.fingerprint}"
    steps = [s for s in queries.funnel(old) if s.variant == "curated"]
    assert [s.step for s in steps if s.bytes is not None] == ["ingest", "curate", "dedup"]   # from the Parquet
    assert f"no byte counters in curate {curate.fingerprint}" in build_page(old)


def test_drop_reasons_are_the_largest_dropped_counters(grid: Selection) -> None:
    reasons = [r for r in queries.drop_reasons(grid, top=3) if r.variant == "curated"]
    assert 0 < len(reasons) <= 3 and [r.docs for r in reasons] == sorted((r.docs for r in reasons), reverse=True)
    curate = grid.runs[2].stages["curate"].stats
    top = max((v, k) for k, v in curate.items() if k.startswith("dropped/"))
    assert reasons[0].docs >= top[0]
    assert all(r.docs == grid.runs[2].stages[r.stage].stats[f"dropped/{r.reason}"] for r in reasons)


def test_composition_is_tokens_per_source_and_the_tokenizers_compression(grid: Selection) -> None:
    rows = queries.tokens_by_source(grid)
    for variant, run in (("raw", grid.runs[0]), ("curated", grid.runs[2])):
        mine = [r for r in rows if r.variant == variant]
        assert {r.source for r in mine} <= {"dolma", "wiki"}
        assert sum(r.train for r in mine) == run.stages["shard"].stats["tokens_train"]
    ratio = queries.bytes_per_token(grid)
    assert set(ratio) == {"raw", "curated"} and ratio["raw"] == grid.runs[0].stages["tokenizer"].stats["bytes_per_token"]


def test_loss_curves_are_read_against_tokens_seen_per_seed(grid: Selection) -> None:
    curves = queries.loss_curves(grid)
    assert {(c.variant, c.seed, c.split) for c in curves} == {(v, s, split) for v in ("raw", "curated")
                                                              for s in (1, 2) for split in ("train", "val")}
    train = next(c for c in curves if c.variant == "curated" and c.seed == 1 and c.split == "train")
    assert train.tokens == sorted(train.tokens) and train.tokens[-1] == 8 * 512
    pretrain = grid.runs[2].stages["pretrain"]
    assert train.loss[-1] == pytest.approx(pretrain.stats["final_train_loss"], rel=1e-6)
    val = next(c for c in curves if c.variant == "curated" and c.seed == 1 and c.split == "val")
    assert val.loss[-1] == pytest.approx(pretrain.stats["final_val_loss"], rel=1e-6)


def test_a_seed_band_is_the_mean_and_range_where_seeds_share_a_token_count() -> None:
    curves = [LossCurve("a", 1, "train", [1, 2, 3], [4.0, 3.0, 2.0]),
              LossCurve("a", 2, "train", [1, 2], [6.0, 5.0])]
    band = queries.seed_band(curves)
    assert (band.x, band.mean, band.low, band.high, band.seeds) == ([1, 2], [5.0, 4.0], [4.0, 3.0], [6.0, 5.0], 2)


def test_scores_carry_one_value_per_seed_and_recompute_from_predictions(grid: Selection) -> None:
    bpb = {s.variant: s for s in queries.scores(grid, "evaluate") if s.metric.endswith("/bpb")}
    assert bpb["curated"].values == [r.stages["evaluate"].stats["heldout/wikitext-2_test.txt/bpb"]
                                     for r in grid.runs[2:]]
    tasks = {(s.variant, s.metric): s for s in queries.task_scores(grid, "finetune")}
    sst2 = tasks[("raw", "sst2/accuracy")]
    rows = [json.loads(line) for line in
            (grid.runs[0].stages["finetune"].output_dir / "sst2/predictions.jsonl").read_text().splitlines()]
    assert sst2.values[0] == pytest.approx(sum(r["prediction"] == r["gold"] for r in rows) / len(rows))
    assert ("curated", "arc_easy/acc_norm") in {(s.variant, s.metric) for s in queries.task_scores(grid, "evaluate")}
    assert set(queries.glue_tables(grid)) == {"raw", "curated"}


def test_sample_efficiency_has_each_fraction_for_pretrained_and_random(grid: Selection) -> None:
    points = queries.sample_efficiency(grid)
    assert {(p.variant, p.init, p.fraction) for p in points} == {(v, i, f) for v in ("raw", "curated")
                                                                 for i in ("pretrained", "random") for f in (0.5, 1.0)}
    full = next(p for p in points if p.variant == "raw" and p.init == "pretrained" and p.fraction == 1.0)
    assert full.values == [r.stages["finetune"].stats["sst2/accuracy"] for r in grid.runs[:2]]


def test_run_facts_list_every_stage_of_every_run(grid: Selection) -> None:
    facts = queries.stage_facts(grid)
    assert len(facts) == sum(len(r.stages) for r in grid.runs)
    shared = [f for f in facts if f.variant == "raw" and f.seed == 2 and f.stage == "ingest"]
    assert shared[0].cached and shared[0].throughput == ""              # seed 2 reused seed 1's ingest
    pretrain = next(f for f in facts if f.stage == "pretrain" and not f.cached)
    assert pretrain.throughput.endswith("tokens/s") and pretrain.mlflow_run_id


def test_the_verdict_ranks_variants_on_held_out_bits_per_byte(grid: Selection) -> None:
    judge = choose_judge(grid)
    assert judge.metric == "evaluate/heldout/wikitext-2_test.txt/bpb" and judge.lower_is_better
    ranked = standings(grid, judge)
    assert {s.variant for s in ranked} == {"raw", "curated"} and ranked[0].mean <= ranked[1].mean
    assert all(s.seeds == 2 for s in ranked)
    # 8 steps see the same first tokens in both variants here, so the scores may tie: the "why" is tested alone
    why = why_html(grid, [Standing("curated", 1.0, 0.0, 2), Standing("raw", 2.0, 0.0, 2)])
    curated, raw = data_facts(grid.runs[2]), data_facts(grid.runs[0])
    assert f"Why: curated trained with documents kept {curated['documents kept']:,.0f} vs " \
           f"{raw['documents kept']:,.0f}" in why and "(against raw)" in why


def test_equal_scores_are_a_tie_and_the_runner_up_is_the_next_score() -> None:
    from dashboards.verdict import Judge, headline_sentence, leaders

    ranked = [Standing("curated", 3.502, 0.0, 1), Standing("curated_dedup", 3.502, 0.0, 1),
              Standing("raw", 4.273, 0.0, 1)]
    assert [s.variant for s in leaders(ranked)] == ["curated", "curated_dedup"]
    text = headline_sentence(Judge("evaluate/heldout/x/bpb", "bits per byte on x", True), ranked)
    assert "tie for first" in text and "3.502 vs 4.273 for raw (-18.0%)" in text and "seed noise is unknown" in text


# ---- the command, MLflow and Prefect -------------------------------------------------------------


def test_ablate_filed_the_page_in_mlflow_and_prefect(built: Workspace, grid: Selection) -> None:
    assert (built.root / "ablations/dash/dashboard.html").is_file()
    client = MlflowClient(f"sqlite:///{built.root / 'mlflow.db'}")
    for run in grid.runs:
        assert [a.path for a in client.list_artifacts(run.mlflow_run_id, "dashboard")] == ["dashboard/dashboard.html"]
    kind, markdown = read_artifact("dashboard-dash", "dashboard: ablation dash")
    assert kind == "markdown" and "dashboard.html" in markdown and grid.runs[0].mlflow_run_id in markdown


def test_the_command_names_a_grid_that_never_ran(built: Workspace, tmp_path: Path) -> None:
    out = run_cli(["dashboard", "nope", "-w", str(built.root), "--out", str(tmp_path / "x.html")])
    assert out.returncode == 1 and "no finished ablation grid 'nope'" in out.stderr
    assert not (tmp_path / "x.html").exists()


# ---- the page in a browser -----------------------------------------------------------------------


def open_page(browser: Browser, path: Path, shot: Path) -> dict[str, dict]:
    """Opens the page; asserts no console error and no request but the file; returns the panels by key."""
    report = browser.open(path, PANEL_SCRIPT)
    shot.write_bytes(report.screenshot)
    print(f"screenshot: {shot}")
    assert report.errors == []
    assert report.requests == [path.resolve().as_uri()]
    return {panel["key"]: panel for panel in report.value}


def test_the_grid_page_draws_every_panel_in_a_browser(built: Workspace, browser: Browser, tmp_path: Path) -> None:
    page = tmp_path / "grid.html"
    out = run_cli(["dashboard", "dash", "-w", str(built.root), "--out", str(page)])
    assert out.returncode == 0, out.stderr[-3000:]
    html = page.read_text()
    assert "<script src=" not in html and "<link " not in html        # plotly's JavaScript is inlined
    assert "on bits per byte on wikitext-2_test.txt (lower is better)" in html        # the verdict's judge
    panels = open_page(browser, page, tmp_path / "grid.png")
    assert list(panels) == ["funnel", "composition", "training", "evaluation", "efficiency", "facts"]
    for key in ("funnel", "composition", "training", "evaluation", "efficiency"):
        assert panels[key]["empty"] == [] and panels[key]["charts"], key
        for chart in panels[key]["charts"]:
            assert chart["points"] > 0 and chart["drawn"] > 0, (key, chart["title"])
            assert 1100 <= chart["width"] <= 1280, (key, chart["width"])      # fits a 1280 px window
    assert panels["facts"]["rows"] == 1 + sum(len(r.stages) for r in queries.select(built, "dash").runs)


def test_a_run_that_stops_at_pretrain_shows_its_empty_states(built: Workspace, browser: Browser,
                                                             tmp_path: Path) -> None:
    out = run_cli(["dashboard", "-w", str(built.root)])
    assert out.returncode == 0, out.stderr[-3000:]
    page = built.root / "dashboards/latest.html"
    panels = open_page(browser, page, tmp_path / "latest.png")
    assert panels["training"]["charts"][0]["points"] > 0
    assert panels["evaluation"]["empty"] == ["no evaluate stage in this run, and no finetune stage"]
    assert panels["efficiency"]["empty"] == ["no finetune stage in this run"]
    assert panels["evaluation"]["charts"] == [] and panels["efficiency"]["charts"] == []
    assert "final validation loss" in page.read_text()          # the judge without an evaluate stage


def test_serve_answers_the_page_on_loopback(built: Workspace, tmp_path: Path) -> None:
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from cliutil import REPO_ROOT

    page = tmp_path / "served.html"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "dashboard", "dash", "-w", str(built.root), "--out",
                             str(page), "--serve", "--port", "0"], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        lines = iter(proc.stdout.readline, "")
        url = next(line.split()[1] for line in lines if line.startswith("serving "))
        assert url.startswith("http://127.0.0.1:") and url.endswith("/served.html")
        with urllib.request.urlopen(url, timeout=30) as reply:
            assert reply.read() == page.read_bytes()
        (tmp_path / "secret.db").write_text("not for the browser")   # the page's folder may be the workspace
        root = url.rsplit("/", 1)[0]
        with urllib.request.urlopen(root + "/", timeout=30) as reply:
            assert reply.read() == page.read_bytes()
        for other in ("/secret.db", "/../secret.db"):
            with pytest.raises(urllib.error.HTTPError, match="404"):
                urllib.request.urlopen(root + other, timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_same_runs_give_the_same_page(built: Workspace, tmp_path: Path) -> None:
    from dashboards.build import build_dashboard

    pages = [build_dashboard(built, "dash", tmp_path / f"{n}.html")[0].read_text() for n in range(2)]
    assert without_build_time(pages[0]) == without_build_time(pages[1])


def without_build_time(page: str) -> str:
    import re

    return re.sub(r"built \d{4}-\d\d-\d\d \d\d:\d\d UTC", "built <time>", page)
