import json

import pyarrow.parquet as pq

from storage.documents import Document, DocumentWriter, count_documents, document_files, iter_documents
from storage.workspace import SUCCESS_FILE, Workspace


def test_commit_renames_temp_dir_and_writes_success_last(tmp_path):
    ws = Workspace.at(tmp_path / "ws")
    tmp = ws.new_temp_dir("ingest", "abc123")
    assert ".tmp-" in tmp.name and not ws.is_done("ingest", "abc123")
    (tmp / "data.txt").write_text("hello")
    final = ws.commit("ingest", "abc123", tmp, {"stats": {"docs_in": 1}})
    assert not tmp.exists() and final == ws.stage_dir("ingest", "abc123")
    success = json.loads((final / SUCCESS_FILE).read_text())
    assert success["files"] == [{"path": "data.txt", "bytes": 5, "sha256": success["files"][0]["sha256"]}]
    assert success["stats"] == {"docs_in": 1} and len(success["output_digest"]) == 64
    assert ws.is_done("ingest", "abc123")


def test_a_renamed_dir_without_success_is_not_done_and_is_replaced(tmp_path):
    ws = Workspace.at(tmp_path)
    final = ws.stage_dir("s", "fp")
    final.mkdir(parents=True)
    (final / "half.parquet").write_text("half")
    assert not ws.is_done("s", "fp")
    tmp = ws.new_temp_dir("s", "fp")
    (tmp / "whole.txt").write_text("whole")
    ws.commit("s", "fp", tmp, {})
    assert sorted(p.name for p in final.iterdir()) == [SUCCESS_FILE, "whole.txt"]


def test_clean_temp_dirs_removes_leftovers_of_crashed_attempts(tmp_path):
    ws = Workspace.at(tmp_path)
    ws.new_temp_dir("s", "fp")
    ws.new_temp_dir("s", "fp")
    assert ws.clean_temp_dirs("s", "fp") == 2
    assert list(ws.stage_dir("s", "fp").parent.iterdir()) == []


def test_document_writer_rolls_files_and_reader_skips_temp_dirs(tmp_path):
    docs = [Document(f"d{i}", "word " * 200, "src", None, {"i": i}) for i in range(50)]
    with DocumentWriter(tmp_path / "out", target_bytes=4000, row_group_rows=4) as writer:
        writer.write_all(docs)
    files = document_files(tmp_path / "out")
    assert len(files) == 13  # 1000 bytes a document, a new file after every 4
    assert [d.id for d in iter_documents(tmp_path / "out")] == [d.id for d in docs]
    assert next(iter_documents(tmp_path / "out")).metadata == {"i": 0}
    assert count_documents(tmp_path / "out") == 50
    assert pq.ParquetFile(files[0]).metadata.row_group(0).column(0).compression == "ZSTD"
    (tmp_path / "out" / "x.tmp-1234").mkdir()
    (tmp_path / "out" / "x.tmp-1234" / "junk.parquet").write_bytes(b"junk")
    assert count_documents(tmp_path / "out") == 50


def test_the_stage_lock_excludes_a_second_holder(tmp_path):
    import fcntl

    import pytest

    ws = Workspace.at(tmp_path)
    with ws.lock("s", "fp"):
        with open(ws.lock_path("s", "fp")) as other:   # a second open file, as another process has
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(ws.lock_path("s", "fp")) as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)   # free again


def test_recommit_replaces_the_old_output_and_leaves_nothing_aside(tmp_path):
    ws = Workspace.at(tmp_path)
    for content in ("old", "new"):
        tmp = ws.new_temp_dir("s", "fp")
        (tmp / "data.txt").write_text(content)
        ws.commit("s", "fp", tmp, {})
    assert (ws.stage_dir("s", "fp") / "data.txt").read_text() == "new"
    assert [p.name for p in ws.stage_dir("s", "fp").parent.iterdir() if ".tmp-" in p.name] == []


def test_files_matching_digest_ignores_are_listed_but_leave_the_output_digest_alone(tmp_path):
    """A deterministic rebuild whose only change is its timings keeps its digest, so later stages stay fresh."""
    ws = Workspace.at(tmp_path)

    def commit(weights: str, timings: str, ignores: tuple[str, ...]) -> dict:
        tmp = ws.new_temp_dir("train", "fp")
        (tmp / "model").mkdir()
        (tmp / "model" / "weights.bin").write_text(weights)
        (tmp / "checkpoints" / "step-2").mkdir(parents=True)
        (tmp / "checkpoints" / "step-2" / "trainer_state.pt").write_text(timings)
        (tmp / "metrics.jsonl").write_text(timings)
        ws.commit("train", "fp", tmp, {}, ignores)
        return ws.read_success("train", "fp")

    ignores = ("metrics.jsonl", "checkpoints/*/trainer_state.pt")
    first, retimed = commit("w", "1.0 s", ignores), commit("w", "1.3 s", ignores)
    assert retimed["output_digest"] == first["output_digest"]
    assert retimed["digest_ignores"] == list(ignores)
    sha = {entry["path"]: entry["sha256"] for entry in retimed["files"]}
    assert set(sha) == {"model/weights.bin", "metrics.jsonl", "checkpoints/step-2/trainer_state.pt"}
    assert sha["metrics.jsonl"] != {e["path"]: e["sha256"] for e in first["files"]}["metrics.jsonl"]
    assert commit("w2", "1.3 s", ignores)["output_digest"] != first["output_digest"]      # the weights count
    assert commit("w", "1.0 s", ())["output_digest"] != commit("w", "1.3 s", ())["output_digest"]
