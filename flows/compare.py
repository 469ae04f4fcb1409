"""`lmforge compare GRID`: the variant x metric table of an ablation grid, with mean and spread over seeds.

The metrics are every stage's headline counters (`Stage.headline`), named `<stage>/<counter>`, read
from the catalog: for each (variant, seed) the grid has now, each stage's current output (`current_outputs`),
so a partial rerun (`lmforge run <variant recipe> --only evaluate`) updates the stages it ran and keeps the
others. The dashboard selects its runs through `grid_members` too.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.stages import PIPELINE_ORDER, STAGES
from storage.catalog import Catalog
from storage.workspace import Workspace

FORMATS = ("table", "csv", "json", "markdown")
# A finished stage row as `member_from_runs` reads it: its pipeline run (run_id, mlflow_run_id, config), then
# the stage's columns (`stage_output`); the queries list rows newest run first.
STAGE_ROW = """p.run_id, p.mlflow_run_id, p.config,
           s.stage, s.fingerprint, s.cached, s.wall_s, s.output_dir, s.mlflow_run_id, s.input_fingerprints"""
FINISHED_NEWEST_FIRST = """p.status = 'finished' and s.status = 'finished'
    order by p.started_at desc, p.run_id, s.started_at"""
GRID_STAGES = f"""
    select a.variant, a.seed, a.position, {STAGE_ROW}
    from ablations a join pipeline_runs p using (run_id) join stage_runs s using (run_id)
    where a.grid = ? and {FINISHED_NEWEST_FIRST}"""
RECIPE_STAGES = f"""
    select {STAGE_ROW}
    from pipeline_runs p join stage_runs s using (run_id)
    where p.recipe_name = ? and {FINISHED_NEWEST_FIRST}"""


MEMBERS_FILE = "grid.json"      # in ablations/<grid>/: the (variant, seed) pairs of the grid as last ablated


def write_members(ws: Workspace, grid: str, members: list[tuple[str, int]]) -> Path:
    """Records which (variant, seed) pairs the grid has now, so a variant or seed since removed is not compared."""
    path = ws.root / "ablations" / grid / MEMBERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"grid": grid, "members": [[variant, seed] for variant, seed in members]}, indent=2))
    return path


def current_members(ws: Workspace, grid: str, members: list[GridMember]) -> list[GridMember]:
    """The grid's current variants and seeds (all of them when the grid's members were never recorded)."""
    try:
        wanted = {(variant, int(seed)) for variant, seed in
                  json.loads((ws.root / "ablations" / grid / MEMBERS_FILE).read_text())["members"]}
    except (OSError, ValueError, KeyError, TypeError):
        return members
    return [member for member in members if (member.variant, member.seed) in wanted]


@dataclass(frozen=True)
class StageOutput:
    """One stage output as a pipeline run recorded it (built there, or reused)."""

    stage: str
    fingerprint: str
    run_id: str                          # the pipeline run that recorded it
    pipeline_mlflow_run_id: str | None   # that run's MLflow parent run
    cached: bool
    wall_s: float | None
    output_dir: str
    mlflow_run_id: str | None            # the stage's nested MLflow run
    input_fingerprints: tuple[str, ...]  # the upstream outputs it was made from


@dataclass(frozen=True)
class GridMember:
    """One (variant, seed) of a grid: its newest finished pipeline run and each stage's current output."""

    variant: str
    seed: int
    position: int
    run_id: str
    mlflow_run_id: str | None
    config: str | None                   # the newest run's recipe (JSON)
    stages: list[StageOutput]            # in pipeline order

    @property
    def run_ids(self) -> list[str]:
        """The pipeline runs its stages come from, newest first (more than one after a partial rerun)."""
        return list(dict.fromkeys([self.run_id, *(out.run_id for out in self.stages)]))

    @property
    def missing(self) -> list[str]:
        """Stages of its recipe with no current output (never run, or only from an upstream output since replaced)."""
        have = {out.stage for out in self.stages}
        return [stage for stage in PIPELINE_ORDER if stage in (recipe_stages(self.config) or ()) and stage not in have]


def grid_members(ws: Workspace, grid: str) -> list[GridMember]:
    """Each (variant, seed) the grid has now, with the output current for each of its stages, in grid order."""
    rows: dict[tuple[str, int], list[tuple[Any, ...]]] = {}
    positions: dict[tuple[str, int], int] = {}
    for variant, seed, position, *row in Catalog(ws.catalog_path).query(GRID_STAGES, params=[grid])[1]:
        key = (variant, int(seed))
        positions.setdefault(key, position)              # the newest run's
        rows.setdefault(key, []).append(tuple(row))
    members = [member_from_runs(ws, variant, seed, positions[(variant, seed)], member_rows)
               for (variant, seed), member_rows in rows.items()]
    return current_members(ws, grid, sorted(members, key=lambda m: (m.position, m.variant, m.seed)))


def member_from_runs(ws: Workspace, variant: str, seed: int, position: int,
                     rows: list[tuple[Any, ...]]) -> GridMember:
    """A (variant, seed) from the finished stage rows (`STAGE_ROW`) of its runs, newest run first: the newest
    run, and each stage's current output across them (`current_outputs`)."""
    run_id, mlflow_id, config = rows[0][:3]
    runs: dict[str, list[StageOutput]] = {}
    for row_run, row_mlflow, _config, *stage in rows:
        runs.setdefault(row_run, []).append(stage_output(row_run, row_mlflow, *stage))
    stages = current_outputs(list(runs.values()), recipe_stages(config),
                             lambda out, upstream: rebuilt_since(ws, out, upstream))
    return GridMember(variant, seed, position, run_id, mlflow_id, config, stages)


def stage_output(run_id: str, pipeline_mlflow_id: str | None, stage: str, fingerprint: str, cached: bool,
                 wall_s: float | None, output_dir: str, mlflow_id: str | None, inputs: str | None) -> StageOutput:
    upstream = json.loads(inputs) if inputs else {}
    return StageOutput(stage, fingerprint, run_id, pipeline_mlflow_id, bool(cached), wall_s, output_dir, mlflow_id,
                       tuple(upstream.values()) if isinstance(upstream, dict) else ())


def recipe_stages(config: str | None) -> set[str] | None:
    """The stages a recipe (a pipeline run's config JSON) enables; None when it names none (not recorded)."""
    try:
        recipe = json.loads(config or "{}")
    except ValueError:
        return None
    stages = {name for name in PIPELINE_ORDER if isinstance(recipe, dict) and recipe.get(name) is not None}
    return stages or None


def current_outputs(runs: list[list[StageOutput]], stages: set[str] | None,
                    rebuilt: Callable[[StageOutput, list[StageOutput]], bool] = lambda out, upstream: False,
                    ) -> list[StageOutput]:
    """Each stage's current output from one (variant, seed)'s finished runs (newest first): what the newest run
    built or reused, the outputs those were made from, then for each other stage of its recipe (`stages`) the
    newest output made from the ones chosen. An output made from another upstream (stale), or from one `rebuilt`
    since, is never chosen."""
    chosen = {out.stage: out for out in runs[0]}
    by_fingerprint: dict[str, StageOutput] = {}
    for out in (out for run in runs for out in run):
        by_fingerprint.setdefault(out.fingerprint, out)
    todo = list(chosen.values())
    while todo:
        for fingerprint in todo.pop().input_fingerprints:
            upstream = by_fingerprint.get(fingerprint)
            if upstream is not None and upstream.stage not in chosen:
                chosen[upstream.stage] = upstream
                todo.append(upstream)
    for stage in PIPELINE_ORDER:
        if stage not in chosen and (stages is None or stage in stages):
            found = next((out for run in runs for out in run if out.stage == stage
                          and _made_from(out, chosen, by_fingerprint) and not rebuilt(out, _upstream(out, chosen))),
                         None)
            if found is not None:
                chosen[stage] = found
    return [chosen[stage] for stage in PIPELINE_ORDER if stage in chosen]


def _upstream(out: StageOutput, chosen: dict[str, StageOutput]) -> list[StageOutput]:
    return [upstream for upstream in chosen.values() if upstream.fingerprint in out.input_fingerprints]


def rebuilt_since(ws: Workspace, out: StageOutput, upstream: list[StageOutput]) -> bool:
    """An upstream output was rebuilt after `out` was made from it (`--force`: same fingerprint, other bytes), so
    `out` is not fresh (its `_SUCCESS.json` records other input digests); False when a record is gone."""
    try:
        made_from = set(ws.read_success(out.stage, out.fingerprint)["input_digests"].values())
        now = {ws.read_success(up.stage, up.fingerprint)["output_digest"] for up in upstream}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return not now <= made_from


def _made_from(out: StageOutput, chosen: dict[str, StageOutput], recorded: dict[str, StageOutput]) -> bool:
    """Every input of `out` that these runs recorded is the output chosen for its stage (an input they never
    recorded, such as the documents a `from_recipe` tokenizer was trained on in its own recipe, cannot be checked)."""
    for fingerprint in out.input_fingerprints:
        upstream = recorded.get(fingerprint)
        if upstream is not None and (upstream.stage not in chosen or chosen[upstream.stage].fingerprint != fingerprint):
            return False
    return True


class NoSuchGridError(LookupError):
    """No finished run of the grid is recorded in this workspace's catalog."""


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)      # the pipeline run each value comes from

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 with one seed)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


@dataclass
class Comparison:
    grid: str
    variants: list[str]
    metrics: list[str]
    cells: dict[tuple[str, str], Cell]
    members: list[GridMember] = field(default_factory=list)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Long format: one row per variant and metric, with the pipeline run of each seed's value."""
        return [{"grid": self.grid, "variant": variant, "metric": metric, "mean": cell.mean, "std": cell.std,
                 "seeds": len(cell.values), "runs": cell.runs}
                for variant in self.variants for metric in self.metrics
                if (cell := self.cells.get((variant, metric))) is not None]


def compare_grid(ws: Workspace, grid: str) -> Comparison:
    """Reads the grid's current stage outputs and their headline counters from the catalog."""
    members = grid_members(ws, grid)
    if not members:
        raise NoSuchGridError(f"no finished run of ablation grid {grid!r} in {ws.root}: run `lmforge ablate` first")
    return _table(grid, members, output_stats(Catalog(ws.catalog_path)))


def output_stats(catalog: Catalog) -> dict[tuple[str, str], dict[str, float]]:
    """(stage, fingerprint) -> the counters of that output (`stage_stats`)."""
    by_output: dict[tuple[str, str], dict[str, float]] = {}
    for stage, fingerprint, name, value in catalog.query("select stage, fingerprint, name, value from stage_stats")[1]:
        by_output.setdefault((stage, fingerprint), {})[name] = value
    return by_output


def _table(grid: str, members: list[GridMember], by_output: dict[tuple[str, str], dict[str, float]]) -> Comparison:
    variants: list[str] = []
    metrics: list[str] = []
    cells: dict[tuple[str, str], Cell] = {}
    for member in members:
        if member.variant not in variants:
            variants.append(member.variant)
        for out in member.stages:
            stats = by_output.get((out.stage, out.fingerprint), {})
            for counter, value in (STAGES[out.stage].headline_stats(stats) if out.stage in STAGES else {}).items():
                metric = f"{out.stage}/{counter}"
                if metric not in metrics:
                    metrics.append(metric)
                cell = cells.setdefault((member.variant, metric), Cell())
                cell.values.append(value)
                cell.runs.append(out.run_id)
    return Comparison(grid, variants, sorted(metrics, key=_pipeline_position), cells, members)


def _pipeline_position(metric: str) -> int:
    """Metrics follow the pipeline (a variant without curate must not push curate's rows to the end)."""
    stage = metric.split("/", 1)[0]
    return PIPELINE_ORDER.index(stage) if stage in PIPELINE_ORDER else len(PIPELINE_ORDER)


def render(table: Comparison, fmt: str) -> str:
    """The comparison as `table` (metrics down, variants across), `markdown`, `csv` or `json` (long rows)."""
    if fmt == "json":
        return json.dumps(table.rows, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["grid", "variant", "metric", "mean", "std", "seeds", "runs"])
        writer.writeheader()
        writer.writerows({**row, "runs": " ".join(row["runs"])} for row in table.rows)
        return out.getvalue()
    return _markdown(table) if fmt == "markdown" else _plain(table)


def _number(value: float) -> str:
    """Counts with thousands separators, other values to four significant digits."""
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _value(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    return _number(cell.mean) if len(cell.values) < 2 else f"{_number(cell.mean)} ± {cell.std:.2g}"


def _grid_cells(table: Comparison) -> list[list[str]]:
    return [[metric, *(_value(table.cells.get((v, metric))) for v in table.variants)] for metric in table.metrics]


def _plain(table: Comparison) -> str:
    header, body = ["metric", *table.variants], _grid_cells(table)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [header, *body]]
    seeds = max((len(c.values) for c in table.cells.values()), default=0)
    return "\n".join([f"ablation {table.grid}: {len(table.variants)} variants"
                      + (f", mean ± std over {seeds} seeds" if seeds > 1 else ""), *lines, *_provenance(table)])


def _provenance(table: Comparison) -> list[str]:
    """Where a (variant, seed)'s stages come from several pipeline runs (a partial rerun), which stages from which;
    and the stages of its recipe that have no current output, so a missing seed is never silent."""
    lines = []
    for member in table.members:
        by_run: dict[str, list[str]] = {}
        for out in member.stages:
            by_run.setdefault(out.run_id, []).append(out.stage)
        parts = [f"{', '.join(stages)} from run {run_id}" for run_id, stages in by_run.items()] if len(by_run) > 1 else []
        if member.missing:
            parts.append(f"no current {', '.join(member.missing)} output (none built from its current upstream)")
        if parts:
            lines.append(f"  {member.variant} seed {member.seed}: " + "; ".join(parts))
    return ["", "partial reruns (each stage shows its current output):", *lines] if lines else []


def _markdown(table: Comparison) -> str:
    header = ["metric", *table.variants]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in _grid_cells(table)]
    notes = [f"- {line.strip()}" if line.startswith("  ") else line for line in _provenance(table)]    # a list
    return "\n".join([*lines, *notes])


def comparison_path(ws: Workspace, grid: str) -> Path:
    return ws.root / "ablations" / grid / "compare.parquet"


def write_parquet(ws: Workspace, table: Comparison) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = comparison_path(ws, table.grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(table.rows), path)
    return path


def publish_comparison(ws: Workspace, grid: str, table: Comparison) -> Path:
    """The table as Parquet in the workspace and, inside a Prefect flow run, as a table artifact."""
    path = write_parquet(ws, table)
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is not None and table.rows:
        create_table_artifact(table.rows, key=f"ablation-{grid.lower().replace('_', '-')}",
                              description=f"ablation {grid}: variants x headline metrics")
    return path
