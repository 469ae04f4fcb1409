"""What each dashboard panel shows, read from the catalog, the stage outputs and their counters.

Every query takes a `Selection` (the pipeline runs being compared: per variant and seed of a grid, each
stage's current output as `lmforge compare` chooses it (`flows.compare.grid_members`), or the same for the
recipe of the latest finished pipeline run) and returns plain rows, so a panel is a
function of data the tests can check without a browser. A stage that is not in a run yields no rows:
the page shows the panel's empty state instead.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.compare import (RECIPE_STAGES, Cell, GridMember, StageOutput, grid_members, member_from_runs,
                           output_stats)
from storage.catalog import Catalog
from storage.workspace import Workspace

LATEST_RUN = """
    select recipe_name, config from pipeline_runs where status = 'finished' order by started_at desc limit 1"""


class NothingToShowError(LookupError):
    """The workspace has no finished run of the grid (or no finished pipeline run at all)."""


@dataclass(frozen=True)
class StageRef:
    """One stage of one pipeline run: which output it used, and how it got it."""

    stage: str
    fingerprint: str
    cached: bool
    wall_s: float | None
    output_dir: Path
    mlflow_run_id: str | None
    stats: dict[str, float]
    run_id: str = ""                             # the pipeline run that recorded it
    pipeline_mlflow_run_id: str | None = None    # that run's MLflow parent run


@dataclass(frozen=True)
class RunRef:
    """One (variant, seed) of a grid, or the latest run on its own; `run_id` is its newest run, and each stage
    says which run it comes from (they differ after a partial rerun)."""

    variant: str
    seed: int
    run_id: str
    mlflow_run_id: str | None
    overrides: dict[str, Any]
    stages: dict[str, StageRef]
    missing: tuple[str, ...] = ()      # stages of its recipe with no current output (`GridMember.missing`)


@dataclass
class Selection:
    """The runs a page compares, their variants in grid order, and where they live."""

    title: str
    grid: str | None
    workspace: Workspace
    runs: list[RunRef]
    variants: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.variants = list(dict.fromkeys(run.variant for run in self.runs))

    def runs_with(self, stage: str) -> list[RunRef]:
        return [run for run in self.runs if stage in run.stages]

    def has(self, stage: str) -> bool:
        return bool(self.runs_with(stage))


# ---- the selection -------------------------------------------------------------------------------


def select(ws: Workspace, grid: str | None) -> Selection:
    """Each (variant, seed) a grid has now with its stages' current outputs, or the workspace's latest finished
    pipeline run."""
    if not ws.catalog_path.is_file():
        raise NothingToShowError(f"no catalog at {ws.catalog_path}: run a recipe or a grid first, or pass --workspace")
    catalog = Catalog(ws.catalog_path)
    members = grid_members(ws, grid) if grid else _latest_recipe(ws, catalog)
    if not members:
        what = f"ablation grid {grid!r}" if grid else "pipeline run"
        raise NothingToShowError(f"no finished {what} in {ws.root}: run `lmforge {'ablate' if grid else 'run'}` first")
    stats = output_stats(catalog)
    runs = [_run_ref(member, stats) for member in members]
    title = f"ablation {grid}" if grid else f"pipeline run {members[0].variant} ({members[0].run_id})"
    return Selection(title, grid, ws, runs)


def _latest_recipe(ws: Workspace, catalog: Catalog) -> list[GridMember]:
    """The recipe (and seed) of the latest finished pipeline run as a member of its own, each stage its current
    output across that recipe's runs, as `lmforge compare` chooses them: after `--only evaluate` the page
    still shows the stages that run reused or left out."""
    latest = catalog.query(LATEST_RUN)[1]
    if not latest:
        return []
    name, config = latest[0]
    seed = _seed(config)
    rows = [row for row in catalog.query(RECIPE_STAGES, params=[name])[1] if _seed(row[2]) == seed]
    # none: the latest run finished without a stage (everything deselected)
    return [member_from_runs(ws, name, seed, 0, rows)] if rows else []


def _seed(config: str | None) -> int:
    return int(json.loads(config or "{}").get("seed", 0))


def _run_ref(member: GridMember, stats: dict[tuple[str, str], dict[str, float]]) -> RunRef:
    ablation = json.loads(member.config or "{}").get("ablation") or {}
    return RunRef(member.variant, member.seed, member.run_id, member.mlflow_run_id, ablation.get("overrides", {}),
                  {out.stage: _stage_ref(out, stats) for out in member.stages}, tuple(member.missing))


def _stage_ref(out: StageOutput, stats: dict[tuple[str, str], dict[str, float]]) -> StageRef:
    return StageRef(out.stage, out.fingerprint, out.cached, out.wall_s, Path(out.output_dir), out.mlflow_run_id,
                    stats.get((out.stage, out.fingerprint), {}), out.run_id, out.pipeline_mlflow_run_id)


def one_per_variant(selection: Selection, stage: str) -> dict[str, StageRef]:
    """The first seed's output of `stage` per variant (data stages rarely depend on the seed)."""
    chosen: dict[str, StageRef] = {}
    for run in selection.runs_with(stage):
        chosen.setdefault(run.variant, run.stages[stage])
    return chosen


# ---- 1. the curation funnel ----------------------------------------------------------------------

FUNNEL_STAT = re.compile(r"^funnel/(\d+)_([^/]+)/(.+)/(in|out|bytes_in|bytes_out)$")


@dataclass(frozen=True)
class FunnelStep:
    variant: str
    step: str          # "ingest", "curate: 03_language", ...
    docs: float
    bytes: float | None  # UTF-8 text bytes kept (None: an output built before the funnel counted bytes)


def funnel(selection: Selection) -> list[FunnelStep]:
    """Documents kept after ingest, after each curate/dedup step, and bytes kept after each stage."""
    doc_bytes = document_bytes(selection)
    steps = []
    for variant, runs in _first_run_per_variant(selection).items():
        for stage in ("ingest", "curate", "dedup"):
            if stage in runs.stages:
                steps += _stage_steps(variant, runs.stages[stage], doc_bytes)
    return steps


def _first_run_per_variant(selection: Selection) -> dict[str, RunRef]:
    chosen: dict[str, RunRef] = {}
    for run in selection.runs:
        chosen.setdefault(run.variant, run)
    return chosen


def _stage_steps(variant: str, ref: StageRef, doc_bytes: dict[tuple[str, str], float]) -> list[FunnelStep]:
    """One step per funnel counter of the stage (summed over sources), then the stage's total."""
    docs, text = _step_totals(ref, "out"), _step_totals(ref, "bytes_out")
    steps = [FunnelStep(variant, f"{ref.stage}: {label}", kept, text.get(label)) for label, kept in sorted(docs.items())]
    final = FunnelStep(variant, ref.stage, ref.stats.get("docs_out", steps[-1].docs if steps else 0.0),
                       doc_bytes.get((ref.stage, ref.fingerprint)))
    return [*steps, final]


def _step_totals(ref: StageRef, counter: str) -> dict[str, float]:
    """Step label -> `funnel/<label>/<source>/<counter>` summed over sources."""
    totals: dict[str, float] = {}
    for name, value in ref.stats.items():
        match = FUNNEL_STAT.match(name)
        if match and match.group(4) == counter:
            label = f"{match.group(1)}_{match.group(2)}"
            totals[label] = totals.get(label, 0.0) + value
    return totals


def missing_byte_counters(selection: Selection) -> list[str]:
    """`stage fingerprint` of curate/dedup outputs whose funnel counts documents but not bytes (built before)."""
    missing = []
    for ref in (r for run in selection.runs for r in run.stages.values() if r.stage in ("curate", "dedup")):
        label = f"{ref.stage} {ref.fingerprint}"
        if _step_totals(ref, "out") and not _step_totals(ref, "bytes_out") and label not in missing:
            missing.append(label)
    return missing


def document_bytes(selection: Selection) -> dict[tuple[str, str], float]:
    """(stage, fingerprint) -> UTF-8 bytes of text in that output's documents (its committed Parquet)."""
    from flows.stages import catalog_views

    wanted = {(ref.stage, ref.fingerprint) for run in selection.runs for ref in run.stages.values()}
    import duckdb

    sql = "select stage, fingerprint, sum(strlen(text)) from documents group by all"   # strlen counts bytes
    try:
        rows = Catalog(selection.workspace.catalog_path).query(sql, catalog_views())[1]
    except duckdb.CatalogException:  # no document output in the workspace, so no `documents` view
        return {}
    return {(stage, fp): float(total or 0) for stage, fp, total in rows if (stage, fp) in wanted}


@dataclass(frozen=True)
class DropReason:
    variant: str
    stage: str
    reason: str         # "language/not_en", ...
    docs: float


def drop_reasons(selection: Selection, top: int = 8) -> list[DropReason]:
    """Per variant, the `top` reasons that removed the most documents across ingest, curate and dedup."""
    reasons = []
    for variant, run in _first_run_per_variant(selection).items():
        found = [DropReason(variant, ref.stage, name.removeprefix("dropped/"), value)
                 for ref in run.stages.values() if ref.stage in ("ingest", "curate", "dedup")
                 for name, value in ref.stats.items() if name.startswith("dropped/") and value > 0]
        reasons += sorted(found, key=lambda r: -r.docs)[:top]
    return reasons


# ---- 2. data composition -------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceTokens:
    variant: str
    source: str
    train: int
    val: int


def tokens_by_source(selection: Selection) -> list[SourceTokens]:
    """Tokens per source and split, from each variant's shard manifest."""
    from storage.formats import ShardManifest

    rows = []
    for variant, ref in one_per_variant(selection, "shard").items():
        manifest = ShardManifest.read(ref.output_dir / "manifest.json")
        rows += [SourceTokens(variant, source, split.train, split.val)
                 for source, split in sorted(manifest.tokens_by_source.items())]
    return rows


def bytes_per_token(selection: Selection) -> dict[str, float]:
    """Variant -> the tokenizer's compression on its held-out documents (UTF-8 bytes per token)."""
    found = {variant: ref.stats.get("bytes_per_token") for variant, ref in one_per_variant(selection, "tokenizer").items()}
    return {variant: value for variant, value in found.items() if value is not None}


# ---- 3. training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossCurve:
    variant: str
    seed: int
    split: str                    # "train" or "val"
    tokens: list[float]           # tokens seen at each point
    loss: list[float]


def loss_curves(selection: Selection) -> list[LossCurve]:
    """Training and validation loss against tokens seen, per run, from pretrain's `metrics.jsonl`."""
    curves = []
    for run in selection.runs_with("pretrain"):
        lines = read_metrics(run.stages["pretrain"].output_dir / "metrics.jsonl")
        for split, key in (("train", "loss"), ("val", "val_loss")):
            points = [(line["tokens"], line[key]) for line in lines
                      if _finite(line.get(key)) and _finite(line.get("tokens"))]
            if points:
                curves.append(LossCurve(run.variant, run.seed, split, [p[0] for p in points], [p[1] for p in points]))
    return curves


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a training log (none when the file is missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class Band:
    """Mean and min/max over seeds at each x (x present in every seed's curve)."""

    x: list[float]
    mean: list[float]
    low: list[float]
    high: list[float]
    seeds: int


def seed_band(curves: list[LossCurve]) -> Band:
    """Lines up the seeds' curves at the token counts they share."""
    shared = sorted(set.intersection(*(set(c.tokens) for c in curves)))
    values = [[dict(zip(c.tokens, c.loss))[x] for c in curves] for x in shared]
    return Band(shared, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values],
                len(curves))


# ---- 4. evaluation and 5. sample efficiency ------------------------------------------------------


@dataclass(frozen=True)
class Score:
    variant: str
    stage: str           # "evaluate" or "finetune"
    metric: str          # "aggregate/core", "arc_easy/acc", "heldout/wikitext-2_test/bpb", "sst2/accuracy", ...
    values: list[float]  # one per seed

    @property
    def mean(self) -> float:
        return Cell(self.values).mean

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 with one seed), as `lmforge compare` reports it."""
        return Cell(self.values).std


def scores(selection: Selection, stage: str) -> list[Score]:
    """Every headline score of `stage` per variant, with one value per seed (the official metrics first)."""
    from flows.stages import STAGES

    collected: dict[tuple[str, str], list[float]] = {}
    for run in selection.runs_with(stage):
        for metric, value in STAGES[stage].headline_stats(run.stages[stage].stats).items():
            if "/curve/" not in metric:
                collected.setdefault((run.variant, metric), []).append(value)
    return [Score(variant, stage, metric, values) for (variant, metric), values in collected.items()]


def task_scores(selection: Selection, stage: str) -> list[Score]:
    """Each task's official metric (the first in its `metrics.json`), per variant and seed."""
    collected: dict[tuple[str, str], list[float]] = {}
    for run in selection.runs_with(stage):
        for task, metric, value in _official_metrics(run.stages[stage].output_dir):
            collected.setdefault((run.variant, f"{task}/{metric}"), []).append(value)
    return [Score(variant, stage, metric, values) for (variant, metric), values in collected.items()]


def _official_metrics(output: Path) -> list[tuple[str, str, float]]:
    """(task, metric, value) from every `<task>/metrics.json` (a flat mapping, the official metric first)."""
    found = []
    for path in sorted(output.glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        first = next(((k, v) for k, v in metrics.items() if _finite(v)), None)
        if first:
            found.append((path.parent.name, first[0], float(first[1])))
    return found


def glue_tables(selection: Selection) -> dict[str, str]:
    """Variant -> finetune's GLUE table (Markdown, the BERT paper's layout), where GLUE tasks ran."""
    tables = {}
    for variant, ref in one_per_variant(selection, "finetune").items():
        path = ref.output_dir / "glue_table.md"
        if path.is_file():
            tables[variant] = path.read_text()
    return tables


@dataclass(frozen=True)
class CurvePoint:
    variant: str
    task: str
    metric: str
    init: str            # "pretrained" or "random"
    fraction: float      # of the task's training data
    values: list[float]  # one per seed

    @property
    def mean(self) -> float:
        return Cell(self.values).mean


CURVE_STAT = re.compile(r"^(.+)/curve/([^/]+)/(\d+)/(.+)$")


def sample_efficiency(selection: Selection) -> list[CurvePoint]:
    """Fine-tuning score at each training fraction, pretrained vs random init (finetune's `curve` counters)."""
    collected: dict[tuple[str, str, str, str, float], list[float]] = {}
    for run in selection.runs_with("finetune"):
        for name, value in run.stages["finetune"].stats.items():
            if match := CURVE_STAT.match(name):
                task, init, percent, metric = match.groups()
                collected.setdefault((run.variant, task, metric, init, int(percent) / 100), []).append(value)
    return [CurvePoint(*key, values) for key, values in sorted(collected.items(), key=lambda kv: kv[0])]


# ---- 6. run facts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageFact:
    variant: str
    seed: int
    stage: str
    fingerprint: str
    cached: bool
    wall_s: float | None
    throughput: str          # "1,234 tokens/s", "56 docs/s" or ""
    mlflow_run_id: str | None
    pipeline_mlflow_run_id: str | None = None    # the pipeline run it comes from (not always the newest)


THROUGHPUT = {"shard": ("tokens_train", "tokens"), "tokenizer": ("train_chars", "chars"),
              "ingest": ("docs_out", "docs"), "curate": ("docs_in", "docs"), "dedup": ("docs_in", "docs")}


def stage_facts(selection: Selection) -> list[StageFact]:
    """Every stage of every run: fingerprint, built or cached, wall time and throughput, its MLflow run."""
    return [StageFact(run.variant, run.seed, ref.stage, ref.fingerprint, ref.cached, ref.wall_s, throughput(ref),
                      ref.mlflow_run_id, ref.pipeline_mlflow_run_id)
            for run in selection.runs for ref in run.stages.values()]


def throughput(ref: StageRef) -> str:
    """Work per second of the stage's own wall time (pretrain: the trainer's tokens/s); empty when cached."""
    if ref.stage == "pretrain" and _finite(ref.stats.get("tokens_per_s")):
        return f"{ref.stats['tokens_per_s']:,.0f} tokens/s"
    counter, unit = THROUGHPUT.get(ref.stage, (None, ""))
    amount = ref.stats.get(counter) if counter else None
    if ref.cached or not amount or not ref.wall_s:
        return ""
    return f"{amount / ref.wall_s:,.0f} {unit}/s"
