import multiprocessing

from flows.stages import catalog_views
from storage.catalog import Catalog, update_stage, utcnow


def _write_stats(path: str, index: int) -> None:
    Catalog(path).record_stats(f"fp{index}", "ingest", {"docs_in": index})


def test_catalog_tables_and_stats_replace(tmp_path):
    catalog = Catalog(tmp_path / "catalog.duckdb")
    catalog.start_pipeline("r1", "demo", 123, "{}", None, None)
    catalog.record_stage({"run_id": "r1", "stage": "ingest", "fingerprint": "fp", "status": "running",
                          "cached": False, "started_at": utcnow()})
    update_stage(catalog, "r1", "ingest", status="finished", wall_s=1.5)
    catalog.record_stats("fp", "ingest", {"docs_in": 3, "docs_out": 2, "dropped/ingest/empty": 1})
    catalog.record_stats("fp", "ingest", {"docs_in": 4, "docs_out": 4})
    _, rows = catalog.query("select name, value from stage_stats order by name")
    assert rows == [("docs_in", 4.0), ("docs_out", 4.0)]
    _, rows = catalog.query("select status, cached, wall_s from stage_runs")
    assert rows == [("finished", False, 1.5)]
    import socket

    assert catalog.running_pipelines() == [("r1", 123, socket.gethostname())]
    catalog.finish_pipeline("r1", "finished")
    assert catalog.running_pipelines() == []


def test_concurrent_writers_wait_for_the_lock(tmp_path):
    path = str(tmp_path / "catalog.duckdb")
    Catalog(path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_stats, args=(path, i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    _, rows = Catalog(path).query("select count(*) from stage_stats")
    assert rows == [(4,)]


def test_documents_view_reads_committed_outputs_only(tmp_path):
    from storage.documents import Document, DocumentWriter

    catalog = Catalog(tmp_path / "catalog.duckdb")
    with DocumentWriter(tmp_path / "stages/ingest/abc/src") as writer:
        writer.write_all(Document(f"d{i}", "text", "src") for i in range(3))
    (tmp_path / "stages/ingest/abc/_SUCCESS.json").write_text("{}")
    with DocumentWriter(tmp_path / "stages/ingest/abc.tmp-1234/src") as writer:
        writer.write(Document("half", "written", "src"))
    with DocumentWriter(tmp_path / "stages/ingest/crashed/src") as writer:   # renamed, no _SUCCESS.json yet
        writer.write(Document("not", "done", "src"))
    _, rows = catalog.query("select stage, fingerprint, count(*) from documents group by all", catalog_views())
    assert rows == [("ingest", "abc", 3)]


def test_an_output_renamed_aside_by_a_forced_commit_is_not_read(tmp_path):
    """`--force` renames the old output to `<fp>.tmp-old-*` (with its `_SUCCESS.json`) before removing it; a
    query in between, or after a kill in between, must not read those documents a second time."""
    from storage.documents import Document, DocumentWriter

    catalog = Catalog(tmp_path / "catalog.duckdb")
    for folder in ("abc", "abc.tmp-old-5678"):
        with DocumentWriter(tmp_path / "stages/ingest" / folder / "src") as writer:
            writer.write_all(Document(f"d{i}", "text", "src") for i in range(3))
        (tmp_path / "stages/ingest" / folder / "_SUCCESS.json").write_text("{}")
    _, rows = catalog.query("select stage, fingerprint, count(*) from documents group by all", catalog_views())
    assert rows == [("ingest", "abc", 3)]
    catalog.export(tmp_path / "export", catalog_views())
    assert ".tmp-" not in (tmp_path / "export/views.sql").read_text()


def test_views_name_stage_and_fingerprint_whatever_the_folders_above_the_workspace_are_called(tmp_path):
    from storage.documents import Document, DocumentWriter

    ws = tmp_path / "stages" / "excluded" / "ws"          # a user's folders may be called anything
    ws.mkdir(parents=True)
    catalog = Catalog(ws / "catalog.duckdb")
    for folder in ("src", "excluded/gopher"):
        with DocumentWriter(ws / "stages/curate/abc" / folder) as writer:
            writer.write_all(Document(f"{folder}{i}", "text", "src") for i in range(2))
    (ws / "stages/curate/abc/_SUCCESS.json").write_text("{}")
    _, rows = catalog.query("select stage, fingerprint, count(*) from documents group by all", catalog_views())
    assert rows == [("curate", "abc", 2)]                 # kept documents only, not those curate removed
    catalog.export(tmp_path / "export", catalog_views())
    import duckdb

    con = duckdb.connect()
    con.execute((tmp_path / "export/views.sql").read_text())
    assert con.execute("select stage, fingerprint, count(*) from documents group by all").fetchall() == rows
