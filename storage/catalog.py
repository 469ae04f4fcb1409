"""The DuckDB catalog: one file that records every pipeline run, stage run and stage counter."""
from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb

SCHEMA = """
create table if not exists pipeline_runs (
    run_id varchar primary key, recipe_name varchar, started_at timestamptz, finished_at timestamptz,
    status varchar, pid integer, mlflow_run_id varchar, prefect_flow_run_id varchar, config json, host varchar
);
create table if not exists stage_runs (
    run_id varchar, stage varchar, fingerprint varchar, status varchar, cached boolean,
    started_at timestamptz, finished_at timestamptz, wall_s double, input_fingerprints json,
    output_dir varchar, mlflow_run_id varchar, error varchar
);
create table if not exists stage_stats (
    fingerprint varchar, stage varchar, name varchar, value double, primary key (fingerprint, stage, name)
);
create table if not exists ablations (
    grid varchar, variant varchar, position integer, seed bigint, run_id varchar, recorded_at timestamptz
);
"""
OPEN_RETRIES = 300   # ~30 s of backoff: writers and the query copy hold the lock for milliseconds
TABLES = ("pipeline_runs", "stage_runs", "stage_stats", "ablations")
# Views over the workspace's committed Parquet outputs, so one query can join counters and data:
# view name -> [(stage, glob under its output)], declared by the stages (`flows.stages.catalog_views`).
OutputViews = dict[str, list[tuple[str, str]]]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def committed_output_globs(root: Path, sources: list[tuple[str, str]]) -> list[str]:
    """Parquet globs of the stage outputs that have `_SUCCESS.json` (a crashed attempt is never read)."""
    globs = []
    for stage, pattern in sources:
        for success in sorted(root.glob(f"stages/{stage}/*/_SUCCESS.json")):
            if any(success.parent.glob(pattern)):
                globs.append(str(success.parent / pattern))
    return globs


def create_output_views(con: duckdb.DuckDBPyConnection, root: Path, views: OutputViews) -> None:
    """One view per name (`documents`, `token_shards`, ...), with `stage` and `fingerprint` columns from each path."""
    for view, sources in views.items():
        globs = committed_output_globs(root, sources)
        if not globs:
            continue
        con.execute(f"""create or replace temp view {view} as
            select *, split_part(split_part(filename, '/stages/', 2), '/', 1) as stage,
                      split_part(split_part(filename, '/stages/', 2), '/', 2) as fingerprint
            from read_parquet({globs!r}, filename = true, union_by_name = true)
            where filename not like '%/excluded/%'""")


class Catalog:
    """Short-lived connections to `<workspace>/catalog.duckdb`, so other processes can read between writes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with self.connect() as con:
            con.execute(SCHEMA)

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """Opens the file, retrying while another process holds DuckDB's write lock."""
        for attempt in range(OPEN_RETRIES):
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.IOException as err:
                if "lock" not in str(err).lower() or attempt == OPEN_RETRIES - 1:
                    raise
                time.sleep(0.05 + random.random() * 0.1)  # back off: the holder releases within milliseconds
        try:
            yield con
        finally:
            con.close()

    def start_pipeline(self, run_id: str, recipe_name: str, pid: int, config_json: str,
                       mlflow_run_id: str | None, prefect_flow_run_id: str | None) -> None:
        import socket

        with self.connect() as con:
            con.execute("insert into pipeline_runs (run_id, recipe_name, started_at, status, pid, mlflow_run_id, "
                        "prefect_flow_run_id, config, host) values (?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                        [run_id, recipe_name, utcnow(), pid, mlflow_run_id, prefect_flow_run_id, config_json,
                         socket.gethostname()])

    def record_ablation(self, grid: str, variant: str, position: int, seed: int, run_id: str) -> None:
        """Pipeline run `run_id` is (variant, seed) of ablation grid `grid`; `position` is the variant's place."""
        with self.connect() as con:
            con.execute("insert into ablations values (?, ?, ?, ?, ?, ?)",
                        [grid, variant, position, seed, run_id, utcnow()])

    def finish_pipeline(self, run_id: str, status: str) -> None:
        with self.connect() as con:
            con.execute("update pipeline_runs set status = ?, finished_at = ? where run_id = ?", [status, utcnow(), run_id])

    def running_pipelines(self) -> list[tuple[str, int | None, str | None]]:
        """(run_id, pid, host) of runs still marked running."""
        with self.connect() as con:
            return con.execute("select run_id, pid, host from pipeline_runs where status = 'running'").fetchall()

    def record_stage(self, row: dict[str, Any]) -> None:
        columns = ["run_id", "stage", "fingerprint", "status", "cached", "started_at", "finished_at", "wall_s",
                   "input_fingerprints", "output_dir", "mlflow_run_id", "error"]
        with self.connect() as con:
            con.execute(f"insert into stage_runs ({', '.join(columns)}) values ({', '.join('?' * len(columns))})",
                        [row.get(c) for c in columns])

    def mark_stale_stages(self, run_id: str, status: str) -> None:
        with self.connect() as con:
            con.execute("update stage_runs set status = ? where run_id = ? and status = 'running'", [status, run_id])

    def record_stats(self, fingerprint: str, stage: str, stats: dict[str, float]) -> None:
        """Replaces the counters of one stage output (a fingerprint's stats are a fact about its output)."""
        with self.connect() as con:
            con.execute("delete from stage_stats where fingerprint = ? and stage = ?", [fingerprint, stage])
            if stats:
                con.executemany("insert into stage_stats values (?, ?, ?, ?)",
                                [[fingerprint, stage, name, float(value)] for name, value in sorted(stats.items())])

    def _copy_tables_into(self, con: duckdb.DuckDBPyConnection) -> None:
        """Attaches the file read-only just long enough to copy its tables (retrying while it is locked)."""
        path = str(self.path).replace("'", "''")
        for attempt in range(OPEN_RETRIES):
            try:
                con.execute(f"attach '{path}' as catalog_file (read_only)")
                break
            except duckdb.IOException as err:
                if "lock" not in str(err).lower() or attempt == OPEN_RETRIES - 1:
                    raise
                time.sleep(0.05 + random.random() * 0.1)
        try:
            for table in TABLES:
                con.execute(f"create table {table} as select * from catalog_file.{table}")
        finally:
            con.execute("detach catalog_file")

    def query(self, sql: str, views: OutputViews | None = None,
              params: list[Any] | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Runs SQL on an in-memory copy of the catalog (a long query never blocks a running pipeline),
        with the workspace's committed Parquet outputs as views; returns column names and rows."""
        con = duckdb.connect()
        try:
            self._copy_tables_into(con)
            create_output_views(con, self.path.parent, views or {})
            cursor = con.execute(sql, params) if params else con.execute(sql)
            names = [d[0] for d in cursor.description] if cursor.description else []
            return names, cursor.fetchall()
        finally:
            con.close()


def _update_stage(con: duckdb.DuckDBPyConnection, run_id: str, stage: str, values: dict[str, Any]) -> None:
    assignments = ", ".join(f"{column} = ?" for column in values)
    con.execute(f"update stage_runs set {assignments} where run_id = ? and stage = ?", [*values.values(), run_id, stage])


def update_stage(catalog: Catalog, run_id: str, stage: str, **values: Any) -> None:
    """Sets columns of one stage run (status, finished_at, wall_s, error...)."""
    with catalog.connect() as con:
        _update_stage(con, run_id, stage, values)
