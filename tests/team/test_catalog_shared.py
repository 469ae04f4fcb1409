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

ROUNDS = 20             # pipeline runs each writer records at least (then more until the readers are done)
WRITER = """
import os, socket, sys
socket.gethostname = lambda: sys.argv[2]          # this process plays another machine
from storage.catalog import Catalog, update_stage, utcnow
catalog, host, stop = Catalog(sys.argv[1]), sys.argv[2], sys.argv[4]
i = 0
while i < int(sys.argv[3]) or not os.path.exists(stop):
    run_id = f"{host}-{i}"
    catalog.start_pipeline(run_id, "shared", 1000 + i, "{}", None, None)
    catalog.record_stage({"run_id": run_id, "stage": "ingest", "fingerprint": f"fp-{run_id}", "status": "running",
                          "cached": False, "started_at": utcnow()})
    catalog.record_stats(f"fp-{run_id}", "ingest", {"docs_in": i, "docs_out": i // 2})
    update_stage(catalog, run_id, "ingest", status="finished", finished_at=utcnow(), wall_s=0.01)
    catalog.finish_pipeline(run_id, "finished")
    i += 1
print(i)
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
def shared_ws(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """Two "machines" record runs at once while `lmforge catalog` queries the workspace: (workspace,
    runs each host recorded). The writers keep writing until two queries have finished, so both
    queries ran while both wrote."""
    ws = tmp_path_factory.mktemp("shared-ws")
    path, stop_file = str(ws / "catalog.duckdb"), ws / "stop-writing"
    Catalog(path)
    committed_documents(ws, "abc", 7)
    hosts = ("node-a", "node-b")
    writers = [child(WRITER, path, host, str(ROUNDS), str(stop_file)) for host in hosts]
    try:
        seen = [cli_count(ws, "select count(*) from pipeline_runs") for _ in range(2)]
        stop_file.touch()
        outputs = [w.communicate(timeout=120) for w in writers]
    finally:
        for writer in writers:
            stop(writer)
    assert [w.returncode for w in writers] == [0, 0], [err[-2000:] for _, err in outputs]
    written = {host: int(out.split()[-1]) for host, (out, _) in zip(hosts, outputs)}
    seen.append(cli_count(ws, "select count(*) from pipeline_runs"))
    assert seen == sorted(seen) and seen[-1] == sum(written.values()), (seen, written)
    return ws, written


def test_two_hosts_writing_at_once_lose_no_row(shared_ws: tuple[Path, dict[str, int]]) -> None:
    shared_ws, written = shared_ws
    out = run_cli(["catalog", "select host, count(*) from pipeline_runs group by host order by host",
                   "-w", str(shared_ws)])                            # the README's command
    assert out.returncode == 0, out.stderr
    assert [line.split() for line in out.stdout.splitlines()[2:4]] == [[h, str(n)] for h, n in written.items()]
    catalog = Catalog(shared_ws / "catalog.duckdb")
    _, runs = catalog.query("select host, count(*) filter (where status = 'finished') from pipeline_runs "
                            "group by host order by host")
    assert runs == list(written.items())
    total = sum(written.values())
    _, stages = catalog.query("select count(*), count(*) filter (where status = 'finished') from stage_runs")
    assert stages == [(total, total)]
    _, stats = catalog.query("select count(*), sum(value) from stage_stats where name = 'docs_in'")
    assert stats == [(total, sum(sum(range(n)) for n in written.values()))]


def test_a_lock_held_too_long_names_its_holder_and_is_freed_when_it_dies(shared_ws: tuple[Path, dict]) -> None:
    shared_ws, written = shared_ws
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
        # every command that opens the catalog says so in one line, not a traceback
        out = run_cli(["compare", "any-grid", "-w", str(shared_ws)], env={"LMFORGE_CATALOG_LOCK_TIMEOUT": "0.5"})
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert f"held by host holder-host pid {holder.pid}" in out.stderr.strip().splitlines()[-1], out.stderr
    finally:
        holder.kill()                                  # SIGKILL: the kernel releases its lock
        holder.wait()
    assert cli_count(shared_ws, "select count(*) from stage_runs", {"LMFORGE_CATALOG_LOCK_TIMEOUT": "300"}) == \
        sum(written.values())


def test_a_bad_lock_timeout_and_a_missing_query_are_named(shared_ws: tuple[Path, dict]) -> None:
    shared_ws, _ = shared_ws
    out = run_cli(["catalog", "select 1", "-w", str(shared_ws)], env={"LMFORGE_CATALOG_LOCK_TIMEOUT": "soon"})
    assert out.returncode == 1
    assert "LMFORGE_CATALOG_LOCK_TIMEOUT='soon': expected a number of seconds above 0" in out.stderr
    out = run_cli(["catalog", "-w", str(shared_ws)])
    assert out.returncode == 2 and "error: give a SQL query or --export DIR (one of them)" in out.stderr


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


def test_the_export_reads_back_in_duckdb_and_pyarrow_as_lmforge_catalog_shows(shared_ws: tuple[Path, dict],
                                                                              tmp_path: Path) -> None:
    shared_ws, _ = shared_ws
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
    # the README's one-liner, in a fresh interpreter
    readme = (f"import duckdb; con = duckdb.connect(); con.execute(open('{export}/views.sql').read()); "
              "print(con.sql('select count(*) from documents'))")
    printed = subprocess.run([sys.executable, "-c", readme], check=False, capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0 and "│            7 │" in printed.stdout, printed.stdout + printed.stderr


def test_threads_of_one_process_take_turns_and_a_holder_may_nest(tmp_path: Path) -> None:
    """POSIX locks belong to a process: its threads queue on an in-process lock before the file lock."""
    from concurrent.futures import ThreadPoolExecutor

    catalog = Catalog(tmp_path / "catalog.duckdb", lock_timeout=30)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: catalog.record_stats(f"fp{i}", "ingest", {"docs_in": i}), range(40)))
    with catalog.locked():                              # several accesses under one hold
        catalog.record_stats("fp-nested", "ingest", {"docs_in": 1})
        assert catalog.query("select count(*) from stage_stats")[1] == [(41,)]
