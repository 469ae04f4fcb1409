"""The shard stage on real corpora: exact tokens, determinism, a stable split, DuckDB, bad input."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from storage.documents import Document
from storage.formats import ShardManifest
from storage.stage import StageError
from tasks.shard import ShardConfig, run
from tasks.shard.stage import MANIFEST_FILE, SPLIT_RULE, split_of
from tasks.tokenizer import TokenizerConfig, load_encoding
from tasks.tokenizer import run as run_tokenizer
from tasks.tokenizer.config import GPT4_PATTERN
from tasks.tokenizer.files import save_vocabulary, with_specials
from tokdata import HARD_STRINGS, raw_corpus_documents, stage_context, write_documents

SPECIALS = ["<|endoftext|>", "[MASK]", "[SEP]"]
TRICKY = [
    Document("tricky/specials", "before <|endoftext|> middle [MASK] [SEP] after<|endoftext|>", "tricky"),
    Document("tricky/empty", "", "tricky"),
    Document("tricky/blank", " \n\t \r\n", "tricky"),
    *[Document(f"tricky/hard-{i}", text, "tricky") for i, text in enumerate(HARD_STRINGS) if text],
]


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return [*raw_corpus_documents(), *TRICKY]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, corpus: list[Document]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shard_inputs")
    docs = write_documents(root / "docs", corpus)
    ctx = stage_context(root, "tokenizer", {"documents": docs})
    run_tokenizer(TokenizerConfig(vocab_size=700, special_tokens=SPECIALS, heldout_docs=0), ctx)
    return {"documents": docs, "tokenizer": ctx.output}


def shard(root: Path, inputs: dict[str, Path], name: str = "shard", **fields) -> tuple[Path, dict]:
    fields = {"val_fraction": 0.1, **fields}
    ctx = stage_context(root, "shard", inputs, name)
    return ctx.output, run(ShardConfig(**fields), ctx).stats


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path]) -> tuple[Path, dict]:
    return shard(tmp_path_factory.mktemp("sharded"), inputs, workers=2, batch_size=64)


def rows(out: Path) -> list[dict]:
    return pq.read_table(out / "shards").to_pylist()


def test_every_document_round_trips_with_encode_ordinary_ids(sharded, inputs, corpus):
    out, stats = sharded
    encoding = load_encoding(inputs["tokenizer"])
    by_id = {row["doc_id"]: row for row in rows(out)}
    kept = [doc for doc in corpus if doc.text.strip()]
    assert len(by_id) == len(kept) == stats["docs_out"]
    for doc in kept:
        row = by_id[doc.id]
        assert row["tokens"] == encoding.encode_ordinary(doc.text), doc.id
        assert encoding.decode(row["tokens"]) == doc.text, doc.id
        assert (row["source"], row["split"]) == (doc.source, split_of(doc.id, 0.1))


def test_text_that_spells_special_tokens_stays_text(sharded, inputs):
    out, _ = sharded
    special_ids = set(json.loads((out / MANIFEST_FILE).read_text())["special_tokens"].values())
    assert len(special_ids) == 3
    assert all(not special_ids & set(row["tokens"]) for row in rows(out))
    encoding = load_encoding(inputs["tokenizer"])
    row = next(r for r in rows(out) if r["doc_id"] == "tricky/specials")
    assert encoding.decode(row["tokens"]) == TRICKY[0].text


def test_manifest_counts_layout_and_stats_agree(sharded, corpus):
    out, stats = sharded
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    table = pq.read_table(out / "shards")
    lengths = pa.compute.list_value_length(table.column("tokens")).to_numpy()
    val = np.asarray(table.column("split").to_pylist()) == "val"
    assert manifest["total_tokens"] == stats["tokens_total"] == lengths.sum()
    assert stats["tokens_val"] == lengths[val].sum() and stats["tokens_train"] == lengths[~val].sum()
    assert sum(s["tokens"] for s in manifest["shards"]) == manifest["total_tokens"]
    assert sum(s["rows"] for s in manifest["shards"]) == table.num_rows
    sources = {s: v["train"] + v["val"] for s, v in manifest["tokens_by_source"].items()}
    assert sources == {s: stats[f"tokens_by_source/{s}"] for s in sources}
    assert manifest["token_dtype"] == "uint16" and table.schema.field("tokens").type.value_type == pa.uint16()
    assert manifest["eot_token"] == "<|endoftext|>" and manifest["eot_id"] == manifest["special_tokens"]["<|endoftext|>"]
    assert manifest["eot_appended"] is False and manifest["vocab_size"] == 700
    assert stats["docs_in"] == len(corpus) == stats["docs_out"] + stats["dropped/shard/empty"]
    # "", a whitespace-only document, and WikiText's blank preamble
    assert stats["dropped/shard/empty"] == sum(1 for doc in corpus if not doc.text.strip()) == 3
    assert 0.05 < stats["docs_val"] / stats["docs_out"] < 0.15


def test_parquet_is_zstd_with_small_row_groups(tmp_path, inputs):
    out, stats = shard(tmp_path, inputs, row_group_rows=100, target_shard_bytes=1_000_000)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert len(manifest["shards"]) == stats["shards"] > 1
    for entry in manifest["shards"]:
        meta = pq.ParquetFile(out / entry["path"]).metadata
        assert meta.num_rows == entry["rows"]
        assert all(meta.row_group(i).num_rows <= 100 for i in range(meta.num_row_groups))
        assert meta.row_group(0).column(3).compression == "ZSTD"


def test_same_input_gives_byte_identical_shards_whatever_the_workers(tmp_path, inputs, sharded):
    first, _ = sharded
    second, _ = shard(tmp_path, inputs, workers=1, batch_size=7)
    names = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_split_is_stable_under_resharding(tmp_path, inputs, sharded):
    first, _ = sharded
    resharded, _ = shard(tmp_path, inputs, name="small", target_shard_bytes=200_000, row_group_rows=50)
    assert len(list((resharded / "shards").glob("*.parquet"))) > 1
    split = {r["doc_id"]: r["split"] for r in rows(first)}
    assert {r["doc_id"]: r["split"] for r in rows(resharded)} == split
    # a larger validation share only moves documents into it, never out of it
    wider, _ = shard(tmp_path, inputs, name="wider", val_fraction=0.3)
    wider_split = {r["doc_id"]: r["split"] for r in rows(wider)}
    assert {d for d, s in split.items() if s == "val"} < {d for d, s in wider_split.items() if s == "val"}


def test_duckdb_reads_the_shards(sharded):
    out, _ = sharded
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    result = duckdb.sql(f"""
        select source, split, sum(len(tokens))::bigint as tokens, count(*) as docs
        from read_parquet('{out}/shards/*.parquet') group by source, split order by source, split""").fetchall()
    expected = sorted((source, split, n) for source, by in manifest["tokens_by_source"].items()
                      for split, n in by.items() if n)
    assert [(s, sp, n) for s, sp, n, _ in result] == expected
    column_type = duckdb.sql(f"select tokens from read_parquet('{out}/shards/*.parquet') limit 1").types[0]
    assert str(column_type) == "USMALLINT[]"


def test_overlong_documents_are_split_or_truncated_and_counted(tmp_path, inputs, corpus):
    encoding = load_encoding(inputs["tokenizer"])
    cap = 300
    long_docs = [doc for doc in corpus if len(encoding.encode_ordinary(doc.text)) > cap]
    split_out, split_stats = shard(tmp_path, inputs, name="split", max_tokens_per_doc=cap, overlong="split")
    assert split_stats["docs_split"] == len(long_docs) > 10
    split_rows = rows(split_out)
    assert max(len(r["tokens"]) for r in split_rows) == cap
    for doc in long_docs[:20]:
        parts = [r for r in split_rows if r["doc_id"].startswith(f"{doc.id}#")]
        assert [r["doc_id"] for r in parts] == [f"{doc.id}#{k}" for k in range(len(parts))]
        assert {r["split"] for r in parts} == {split_of(doc.id, 0.1)}
        assert encoding.decode([t for r in parts for t in r["tokens"]]) == doc.text
    cut_out, cut_stats = shard(tmp_path, inputs, name="cut", max_tokens_per_doc=cap, overlong="truncate")
    assert cut_stats["docs_truncated"] == len(long_docs)
    assert cut_stats["tokens_truncated"] == split_stats["tokens_total"] - cut_stats["tokens_total"]
    cut_rows = {r["doc_id"]: r["tokens"] for r in rows(cut_out)}
    assert cut_rows[long_docs[0].id] == encoding.encode_ordinary(long_docs[0].text)[:cap]
    assert cut_stats["docs_out"] == split_stats["docs_out"] == len(cut_rows)


def test_vocab_above_uint16_gives_uint32_tokens(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    vocab = with_specials(ranks, GPT4_PATTERN, ["<|endoftext|>"], "test", known={"<|endoftext|>": 70_000})
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    save_vocabulary(vocab, tokenizer)
    docs = write_documents(tmp_path / "docs", [Document("a", "héllo", "s"), Document("b", "<|endoftext|>", "s")])
    out, stats = shard(tmp_path, {"documents": docs, "tokenizer": tokenizer})
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["token_dtype"] == "uint32" and manifest["vocab_size"] == 70_001
    table = pq.read_table(out / "shards")
    assert table.schema.field("tokens").type.value_type == pa.uint32()
    assert table.column("tokens").to_pylist() == [list("héllo".encode()), list(b"<|endoftext|>")]


def test_bad_inputs_are_named(tmp_path, inputs):
    with pytest.raises(StageError, match="input 'tokenizer' is missing"):
        shard(tmp_path, {"documents": inputs["documents"]}, name="a")
    bad = tmp_path / "bad_docs"
    bad.mkdir()
    (bad / "part-00000.parquet").write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(StageError, match="part-00000.parquet: not a readable Parquet file"):
        shard(tmp_path, {"documents": bad, "tokenizer": inputs["tokenizer"]}, name="b")
    with pytest.raises(StageError, match="tokenizer_config.json: missing"):
        shard(tmp_path, {"documents": inputs["documents"], "tokenizer": tmp_path}, name="c")


@pytest.mark.parametrize("fields, message", [
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"max_tokens_per_doc": 0}, "max_tokens_per_doc"),
    ({"overlong": "drop"}, "overlong"),
    ({"row_group_rows": 0}, "row_group_rows"),
    ({"shard_size": 10}, "shard_size"),
])
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValidationError, match=message):
        ShardConfig(**fields)


def test_workers_and_batch_size_do_not_enter_the_fingerprint():
    assert ShardConfig(workers=1, batch_size=3).output_fields() == ShardConfig().output_fields()
    assert ShardConfig(val_fraction=0.01).output_fields() != ShardConfig().output_fields()


# --- the typed manifest --------------------------------------------------------------------------------

def test_manifest_is_the_typed_file(sharded):
    out, stats = sharded
    manifest = ShardManifest.read(out / MANIFEST_FILE)
    assert manifest.total_tokens == stats["tokens_total"] and manifest.tokens_val == stats["tokens_val"]
    assert manifest.split_rule == SPLIT_RULE and "shard-split" in manifest.split_rule


@pytest.mark.parametrize("change, field", [
    (lambda m: m.update(token_dtype="int8"), "token_dtype"),
    (lambda m: m.update(total_tokens=m["total_tokens"] + 1), "total_tokens"),
    (lambda m: m["shards"][0].update(tokens_val=m["shards"][0]["tokens_val"] + 1), "shards.0.tokens_val"),
    (lambda m: m.update(eot_id=0), "eot_id"),
    (lambda m: m.pop("split_rule"), "split_rule"),
    (lambda m: m.update(token_dtype="uint32"), "token_dtype"),      # a 700-token vocabulary is uint16
    (lambda m: m["tokens_by_source"]["shakespeare"].pop("val"), "tokens_by_source.shakespeare.val"),
])
def test_a_wrong_manifest_fails_naming_the_field(sharded, tmp_path, change, field):
    out, _ = sharded
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    change(manifest)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(StageError, match=f"{MANIFEST_FILE}: .*field '{field}'"):
        ShardManifest.read(tmp_path / MANIFEST_FILE)


# --- the split ------------------------------------------------------------------------------------------

def test_the_split_rule_in_the_manifest_says_what_split_of_does():
    """The manifest's description is enough to recompute the split without lmforge."""
    ids = [f"doc-{i}" for i in range(2000)] + ["héllo/ünïcode", ""]
    for doc_id in ids:
        digest = hashlib.sha256(b"shard-split" + b"\0" + doc_id.encode()).digest()
        expected = "val" if int.from_bytes(digest[:8], "big") / 2**64 < 0.1 else "train"
        assert split_of(doc_id, 0.1) == expected


# --- an upstream stage that kept nothing ----------------------------------------------------------------

def test_zero_documents_give_an_empty_shard_output(tmp_path, inputs):
    empty = tmp_path / "no_docs"
    empty.mkdir()
    out, stats = shard(tmp_path, {"documents": empty, "tokenizer": inputs["tokenizer"]}, name="empty")
    manifest = ShardManifest.read(out / MANIFEST_FILE)
    assert manifest.shards == [] and manifest.total_tokens == 0 and manifest.tokens_by_source == {}
    assert stats["docs_in"] == stats["docs_out"] == stats["tokens_total"] == stats["shards"] == 0
    assert not (out / "shards").exists()
