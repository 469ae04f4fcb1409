"""The DuckDB catalog: one file that records every pipeline run, stage run and stage counter.

Every access, read or write, holds `catalog.duckdb.lock` (a POSIX `lockf` lock beside the file) for
the milliseconds it takes, and no connection outlives it. DuckDB's own file lock is one process's
at a time too, but on a network filesystem DuckDB does not support concurrent writers; an explicit
POSIX lock is what NFS (through its lock manager) and every local filesystem do honour across
machines. The kernel or the NFS server releases it when its holder dies, so it never goes stale;
a waiter that gives up names the holder (host, pid, command) written into the lock file.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

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
OPEN_RETRIES = 300   # ~30 s of backoff while another program (a `duckdb` shell) holds DuckDB's own lock
T = TypeVar("T")
LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT_S = "LMFORGE_CATALOG_LOCK_TIMEOUT", 120.0
TABLES = ("pipeline_runs", "stage_runs", "stage_stats", "ablations")
# Views over the workspace's committed Parquet outputs, so one query can join counters and data:
# view name -> [(stage, glob under its output)], declared by the stages (`flows.stages.catalog_views`).
OutputViews = dict[str, list[tuple[str, str]]]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def committed_output_globs(root: Path, sources: list[tuple[str, str]]) -> list[str]:
    """Parquet globs of the stage outputs that have `_SUCCESS.json` (a crashed attempt is never read, nor an old
    output a `--force` commit renamed aside to `<fingerprint>.tmp-old-*`)."""
    globs = []
    for stage, pattern in sources:
        for success in sorted(root.glob(f"stages/{stage}/*/_SUCCESS.json")):
            if ".tmp-" not in success.parent.name and any(success.parent.glob(pattern)):
                globs.append(str(success.parent / pattern))
    return globs


def output_view_sql(view: str, globs: list[str], root: Path, kind: str = "temp view") -> str:
    """`create or replace <kind> <view>` over `globs`, with `stage` and `fingerprint` columns from each path.

    Both are read from the path below `<root>/stages/`, and so is `excluded/` (curate's removed documents):
    the folders above the workspace may have any name.
    """
    below = f"substr(filename, {len(str(root / 'stages')) + 2})"      # '<stage>/<fingerprint>/...'
    return f"""create or replace {kind} {view} as
    select *, split_part({below}, '/', 1) as stage, split_part({below}, '/', 2) as fingerprint
    from read_parquet({globs!r}, filename = true, union_by_name = true)
    where {below} not like '%/excluded/%'"""


def create_output_views(con: duckdb.DuckDBPyConnection, root: Path, views: OutputViews) -> None:
    """One view per name (`documents`, `token_shards`, ...) over the committed outputs that have files."""
    for view, sources in views.items():
        globs = committed_output_globs(root, sources)
        if globs:
            con.execute(output_view_sql(view, globs, root))


# ---- the lock every access holds -------------------------------------------------------------


class CatalogLockError(RuntimeError):
    """The catalog's lock could not be taken: held past the timeout (the message names the holder), unsupported,
    or its timeout setting is not a number of seconds."""


def lock_timeout_s() -> float:
    """`LMFORGE_CATALOG_LOCK_TIMEOUT` seconds, else 120."""
    value = os.environ.get(LOCK_TIMEOUT_ENV)
    if value is None:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise CatalogLockError(f"{LOCK_TIMEOUT_ENV}={value!r}: expected a number of seconds above 0")
    return seconds


# POSIX locks belong to the process, not the file descriptor: threads of one process take this
# lock first, so the process holds the file lock once and only its outermost holder releases it.
_THREAD_LOCKS: dict[str, threading.RLock] = {}
_DEPTH: dict[str, int] = {}


@contextmanager
def catalog_lock(lock_path: Path, timeout: float) -> Iterator[None]:
    """Holds `lock_path` exclusively (reentrant in a thread); CatalogLockError after `timeout` seconds."""
    key = str(lock_path)
    thread_lock = _THREAD_LOCKS.setdefault(key, threading.RLock())
    if not thread_lock.acquire(timeout=timeout):
        raise CatalogLockError(f"{lock_path}: another thread of this process held it for more than {timeout:g} s")
    try:
        if _DEPTH.get(key):
            _DEPTH[key] += 1
            try:
                yield
            finally:
                _DEPTH[key] -= 1
            return
        with _file_lock(lock_path, timeout):
            _DEPTH[key] = 1
            try:
                yield
            finally:
                _DEPTH[key] = 0
    finally:
        thread_lock.release()


@contextmanager
def _file_lock(lock_path: Path, timeout: float) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EACCES, errno.EAGAIN):    # e.g. ENOLCK: NFS without its lock manager
                    raise CatalogLockError(f"cannot lock {lock_path}: {err.strerror}; on NFS the lock manager "
                                             "(lockd, or NFSv4) must run for several machines to share a "
                                             "workspace") from None
                if time.monotonic() > deadline:                      # another process holds it
                    raise CatalogLockError(_timeout_message(lock_path, timeout)) from None
                time.sleep(0.01 + random.random() * 0.04)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": utcnow().isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)                      # releases the lock


def _timeout_message(lock_path: Path, timeout: float) -> str:
    try:
        holder = json.loads(lock_path.read_text())
        who = f"host {holder['host']} pid {holder['pid']} (since {holder['since']}: {holder['command']})"
    except (OSError, ValueError, KeyError):
        who = "a process that has not written its name yet"
    return (f"catalog lock {lock_path} is held by {who} for more than {timeout:g} s; wait for it to finish, or "
            f"raise {LOCK_TIMEOUT_ENV} (seconds). The lock is released when its holder exits, on any host.")


class Catalog:
    """Short-lived connections to `<workspace>/catalog.duckdb` under its lock, so other processes and
    other machines sharing the workspace read and write between each other's accesses."""

    def __init__(self, path: Path, lock_timeout: float | None = None) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.lock_timeout = lock_timeout if lock_timeout is not None else lock_timeout_s()
        with self.connect() as con:
            con.execute(SCHEMA)

    def locked(self) -> AbstractContextManager[None]:
        """The catalog's lock (held by every access): callers group several accesses under one."""
        return catalog_lock(self.lock_path, self.lock_timeout)

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """Opens the file under the lock, retrying while another program holds DuckDB's own lock."""
        with self.locked():
            con = _retrying_on_duckdb_lock(lambda: duckdb.connect(str(self.path), read_only=read_only))
            try:
                yield con
            finally:
                con.close()

    def start_pipeline(self, run_id: str, recipe_name: str, pid: int, config_json: str,
                       mlflow_run_id: str | None, prefect_flow_run_id: str | None) -> None:
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
        """Attaches the file read-only, under the lock, just long enough to copy its tables."""
        with self.locked():
            attach = f"attach '{_sql_string(self.path)}' as catalog_file (read_only)"
            _retrying_on_duckdb_lock(lambda: con.execute(attach))
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

    def export(self, out: Path, views: OutputViews | None = None) -> list[Path]:
        """Each table as `<table>.parquet` in `out`, then `views.sql`: views of the same names over those
        files, and the output views over the workspace's committed Parquet, all by absolute path."""
        out = Path(out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        written, statements = [], []
        con = duckdb.connect()
        try:
            self._copy_tables_into(con)
            for table in TABLES:
                target = out / f"{table}.parquet"
                con.execute(f"copy {table} to '{_sql_string(target)}' (format parquet)")
                written.append(target)
                statements.append(f"create or replace view {table} as select * from "
                                  f"read_parquet('{_sql_string(target)}')")
        finally:
            con.close()
        for view, sources in (views or {}).items():
            globs = committed_output_globs(self.path.parent, sources)
            if globs:
                statements.append(output_view_sql(view, globs, self.path.parent, kind="view"))
        header = (f"-- lmforge catalog export of {self.path} at {utcnow().isoformat(timespec='seconds')}\n"
                  "-- duckdb: .read views.sql   python: duckdb.connect().execute(open('views.sql').read())\n")
        (out / "views.sql").write_text(header + "".join(f"{statement};\n" for statement in statements))
        return [*written, out / "views.sql"]


def _sql_string(path: Path) -> str:
    return str(path).replace("'", "''")


def _retrying_on_duckdb_lock(open_file: Callable[[], T]) -> T:
    """`open_file()`, retried while another program (a `duckdb` shell) holds DuckDB's own file lock."""
    for attempt in range(OPEN_RETRIES):
        try:
            return open_file()
        except duckdb.IOException as err:
            if "lock" not in str(err).lower() or attempt == OPEN_RETRIES - 1:
                raise
            time.sleep(0.05 + random.random() * 0.1)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _update_stage(con: duckdb.DuckDBPyConnection, run_id: str, stage: str, values: dict[str, Any]) -> None:
    assignments = ", ".join(f"{column} = ?" for column in values)
    con.execute(f"update stage_runs set {assignments} where run_id = ? and stage = ?", [*values.values(), run_id, stage])


def update_stage(catalog: Catalog, run_id: str, stage: str, **values: Any) -> None:
    """Sets columns of one stage run (status, finished_at, wall_s, error...)."""
    with catalog.connect() as con:
        _update_stage(con, run_id, stage, values)
