"""`lmforge compare GRID`: the variant x metric table of an ablation grid, with mean and spread over seeds.

The metrics are every stage's headline counters (`Stage.headline`), named `<stage>/<counter>`, read
from the catalog: for each (variant, seed) the grid has now, the latest finished pipeline run recorded for it.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.stages import PIPELINE_ORDER, STAGES
from storage.catalog import Catalog
from storage.workspace import Workspace

FORMATS = ("table", "csv", "json", "markdown")
# `runs`: a grid's finished pipeline runs; `newest = 1` marks the latest per (variant, seed). The dashboard
# selects its runs through it too.
GRID_RUNS_CTE = """
    with runs as (
        select a.variant, a.position, a.seed, a.run_id,
               row_number() over (partition by a.variant, a.seed order by p.started_at desc) as newest
        from ablations a join pipeline_runs p using (run_id)
        where a.grid = ? and p.status = 'finished')"""
LATEST_RUNS = GRID_RUNS_CTE + """
    select r.variant, r.seed, s.stage, s.fingerprint
    from runs r join stage_runs s using (run_id)
    where r.newest = 1 and s.status = 'finished'
    order by r.position, r.variant, r.seed, s.started_at"""


MEMBERS_FILE = "grid.json"      # in ablations/<grid>/: the (variant, seed) pairs of the grid as last ablated


def write_members(ws: Workspace, grid: str, members: list[tuple[str, int]]) -> Path:
    """Records which (variant, seed) pairs the grid has now, so a variant or seed since removed is not compared."""
    path = ws.root / "ablations" / grid / MEMBERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"grid": grid, "members": [[variant, seed] for variant, seed in members]}, indent=2))
    return path


def current_members(ws: Workspace, grid: str, rows: list[tuple]) -> list[tuple]:
    """The catalog rows `(variant, seed, ...)` of the grid's current variants and seeds (all of them when the
    grid's members were never recorded)."""
    try:
        members = {(variant, int(seed)) for variant, seed in
                   json.loads((ws.root / "ablations" / grid / MEMBERS_FILE).read_text())["members"]}
    except (OSError, ValueError, KeyError, TypeError):
        return rows
    return [row for row in rows if (row[0], int(row[1])) in members]


class NoSuchGridError(LookupError):
    """No finished run of the grid is recorded in this workspace's catalog."""


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)

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

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Long format: one row per variant and metric."""
        return [{"grid": self.grid, "variant": variant, "metric": metric, "mean": cell.mean, "std": cell.std,
                 "seeds": len(cell.values)}
                for variant in self.variants for metric in self.metrics
                if (cell := self.cells.get((variant, metric))) is not None]


def compare_grid(ws: Workspace, grid: str) -> Comparison:
    """Reads the grid's latest finished runs and their stages' headline counters from the catalog."""
    catalog = Catalog(ws.catalog_path)
    runs = current_members(ws, grid, catalog.query(LATEST_RUNS, params=[grid])[1])
    if not runs:
        raise NoSuchGridError(f"no finished run of ablation grid {grid!r} in {ws.root}: run `lmforge ablate` first")
    _, stats = catalog.query("select stage, fingerprint, name, value from stage_stats")
    by_output: dict[tuple[str, str], dict[str, float]] = {}
    for stage, fingerprint, name, value in stats:
        by_output.setdefault((stage, fingerprint), {})[name] = value
    return _table(grid, runs, by_output)


def _table(grid: str, runs: list[tuple], by_output: dict[tuple[str, str], dict[str, float]]) -> Comparison:
    variants: list[str] = []
    metrics: list[str] = []
    cells: dict[tuple[str, str], Cell] = {}
    for variant, _seed, stage, fingerprint in runs:
        if variant not in variants:
            variants.append(variant)
        headline = STAGES[stage].headline_stats(by_output.get((stage, fingerprint), {})) if stage in STAGES else {}
        for counter, value in headline.items():
            metric = f"{stage}/{counter}"
            if metric not in metrics:
                metrics.append(metric)
            cells.setdefault((variant, metric), Cell()).values.append(value)
    return Comparison(grid, variants, sorted(metrics, key=_pipeline_position), cells)


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
        writer = csv.DictWriter(out, fieldnames=["grid", "variant", "metric", "mean", "std", "seeds"])
        writer.writeheader()
        writer.writerows(table.rows)
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
                      + (f", mean ± std over {seeds} seeds" if seeds > 1 else ""), *lines])


def _markdown(table: Comparison) -> str:
    header = ["metric", *table.variants]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in _grid_cells(table)]
    return "\n".join(lines)


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
