"""The catalog on a workspace several machines share: real processes writing at once, the lock, the export.

Machines are simulated by processes that report another hostname (`socket.gethostname` replaced in
the child before lmforge is imported); the lock they share is the real POSIX lock on
`catalog.duckdb.lock` that NFS honours across hosts.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from cliutil import REPO_ROOT, run_cli

from flows.stages import catalog_views
from storage.catalog import Catalog

ROUNDS = 30             # pipeline runs each writer records
WRITER = """
import socket, sys
socket.gethostname = lambda: sys.argv[2]          # this process plays another machine
from storage.catalog import Catalog, update_stage, utcnow
catalog, host = Catalog(sys.argv[1]), sys.argv[2]
for i in range(int(sys.argv[3])):
    run_id = f"{host}-{i}"
    catalog.start_pipeline(run_id, "shared", 1000 + i, "{}", None, None)
    catalog.record_stage({"run_id": run_id, "stage": "ingest", "fingerprint": f"fp-{run_id}", "status": "running",
                          "cached": False, "started_at": utcnow()})
    catalog.record_stats(f"fp-{run_id}", "ingest", {"docs_in": i, "docs_out": i // 2})
    update_stage(catalog, run_id, "ingest", status="finished", finished_at=utcnow(), wall_s=0.01)
    catalog.finish_pipeline(run_id, "finished")
"""
HOLDER = """
import socket, sys, time
socket.gethostname = lambda: "holder-host"
from storage.catalog import Catalog
with Catalog(sys.argv[1]).locked():
    print("holding", flush=True)
    time.sleep(600)
"""


def child(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cli_count(ws: Path, sql: str, env: dict[str, str] | None = None) -> int:
    out = run_cli(["catalog", sql, "-w", str(ws)], env=env)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.splitlines()[2])          # header, rule, the value


def committed_documents(ws: Path, fingerprint: str, count: int) -> None:
    """An ingest output as the stage commits it, for the `documents` output view."""
    from storage.documents import Document, DocumentWriter

    with DocumentWriter(ws / "stages" / "ingest" / fingerprint / "wiki") as writer:
        writer.write_all(Document(f"d{i}", f"text {i}", "wiki") for i in range(count))
    (ws / "stages" / "ingest" / fingerprint / "_SUCCESS.json").write_text("{}")


@pytest.fixture(scope="module")
def shared_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two "machines" record runs at once while `lmforge catalog` queries the workspace in a loop."""
    ws = tmp_path_factory.mktemp("shared-ws")
    path = str(ws / "catalog.duckdb")
    Catalog(path)
    committed_documents(ws, "abc", 7)
    writers = [child(WRITER, path, host, str(ROUNDS)) for host in ("node-a", "node-b")]
    seen = []
    try:
        while any(w.poll() is None for w in writers) or len(seen) < 2:
            seen.append(cli_count(ws, "select count(*) from pipeline_runs"))
        outputs = [w.communicate(timeout=120) for w in writers]
    finally:
        for writer in writers:
            stop(writer)
    assert [w.returncode for w in writers] == [0, 0], [err[-2000:] for _, err in outputs]
    print(f"lmforge catalog ran {len(seen)} times while the writers wrote: {seen}")
    assert seen == sorted(seen) and seen[-1] == 2 * ROUNDS and all(0 <= n <= 2 * ROUNDS for n in seen), seen
    return ws


def test_two_hosts_writing_at_once_lose_no_row(shared_ws: Path) -> None:
    catalog = Catalog(shared_ws / "catalog.duckdb")
    _, runs = catalog.query("select host, count(*), count(*) filter (where status = 'finished') "
                            "from pipeline_runs group by host order by host")
    assert runs == [("node-a", ROUNDS, ROUNDS), ("node-b", ROUNDS, ROUNDS)]
    _, stages = catalog.query("select count(*), count(*) filter (where status = 'finished') from stage_runs")
    assert stages == [(2 * ROUNDS, 2 * ROUNDS)]
    _, stats = catalog.query("select count(*), sum(value) from stage_stats where name = 'docs_in'")
    assert stats == [(2 * ROUNDS, 2 * sum(range(ROUNDS)))]


def test_a_lock_held_too_long_names_its_holder_and_is_freed_when_it_dies(shared_ws: Path) -> None:
    holder = child(HOLDER, str(shared_ws / "catalog.duckdb"))
    try:
        assert holder.stdout.readline().strip() == "holding"
        started = time.monotonic()
        out = run_cli(["catalog", "select count(*) from stage_runs", "-w", str(shared_ws)],
                      env={"LMFORGE_CATALOG_LOCK_TIMEOUT": "1.5"})
        assert out.returncode == 1, out.stdout
        assert re.search(rf"catalog lock \S+catalog.duckdb.lock is held by host holder-host pid {holder.pid} "
                         r"\(since .*\) for more than 1.5 s; .*raise LMFORGE_CATALOG_LOCK_TIMEOUT", out.stderr), \
            out.stderr
        assert time.monotonic() - started < 60
    finally:
        holder.kill()                                  # SIGKILL: the kernel releases its lock
        holder.wait()
    assert cli_count(shared_ws, "select count(*) from stage_runs", {"LMFORGE_CATALOG_LOCK_TIMEOUT": "5"}) == 2 * ROUNDS


def test_a_bad_lock_timeout_is_named(shared_ws: Path) -> None:
    out = run_cli(["catalog", "select 1", "-w", str(shared_ws)], env={"LMFORGE_CATALOG_LOCK_TIMEOUT": "soon"})
    assert out.returncode == 1
    assert "LMFORGE_CATALOG_LOCK_TIMEOUT='soon': expected a number of seconds above 0" in out.stderr


def test_another_hosts_runs_are_never_marked_killed_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from flows.pipeline import mark_dead_runs
    from storage.tracking import Tracker

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                        # a pid that no longer runs, on this host
    catalog, tracker = Catalog(tmp_path / "catalog.duckdb"), Tracker(tmp_path, "shared")
    here = socket.gethostname()
    runs = {"here-dead": (dead.pid, here), "here-alive": (os.getpid(), here), "there": (dead.pid, "another-host")}
    mlflow_ids = {}
    for run_id, (pid, host) in runs.items():
        with monkeypatch.context() as patch:
            patch.setattr(socket, "gethostname", lambda host=host: host)     # the run's own machine
            catalog.start_pipeline(run_id, "shared", pid, "{}", None, None)
        mlflow_ids[run_id] = tracker.start_run(run_id, tags={"lmforge.pid": str(pid), "lmforge.host": host})

    mark_dead_runs(catalog, tracker)

    _, rows = catalog.query("select run_id, status from pipeline_runs order by run_id")
    assert rows == [("here-alive", "running"), ("here-dead", "killed"), ("there", "running")]
    statuses = {run_id: tracker.client.get_run(mlflow_id).info.status for run_id, mlflow_id in mlflow_ids.items()}
    assert statuses == {"here-dead": "KILLED", "here-alive": "RUNNING", "there": "RUNNING"}


def test_the_export_reads_back_in_duckdb_and_pyarrow_as_lmforge_catalog_shows(shared_ws: Path,
                                                                              tmp_path: Path) -> None:
    out = run_cli(["catalog", "--export", str(tmp_path / "export"), "-w", str(shared_ws)])
    assert out.returncode == 0, out.stderr
    export = tmp_path / "export"
    assert sorted(p.name for p in export.iterdir()) == ["ablations.parquet", "pipeline_runs.parquet",
                                                        "stage_runs.parquet", "stage_stats.parquet", "views.sql"]
    catalog = Catalog(shared_ws / "catalog.duckdb")
    fresh = duckdb.connect()                           # another tool: never opens catalog.duckdb
    fresh.execute((export / "views.sql").read_text())
    for sql in ("select * from pipeline_runs order by run_id", "select * from stage_runs order by run_id",
                "select * from stage_stats order by fingerprint, name",
                "select stage, fingerprint, id, text from documents order by id"):
        assert fresh.execute(sql).fetchall() == catalog.query(sql, catalog_views())[1], sql
    table = pq.read_table(export / "stage_stats.parquet").sort_by([("fingerprint", "ascending"), ("name", "ascending")])
    assert [tuple(row.values()) for row in table.to_pylist()] == \
        catalog.query("select * from stage_stats order by fingerprint, name")[1]
    assert fresh.execute("select count(*) from documents").fetchone()[0] == \
        cli_count(shared_ws, "select count(*) from documents") == 7
    assert json.loads(fresh.execute("select config from pipeline_runs limit 1").fetchone()[0]) == {}
