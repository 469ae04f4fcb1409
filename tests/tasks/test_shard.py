"""The shard stage on real corpora: exact tokens, determinism, a stable split, DuckDB, bad input."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
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
from tasks.shard import STAGE as SHARD_STAGE
from tasks.shard import ShardConfig, run
from tasks.shard.stage import MANIFEST_FILE, SPLIT_RULE, split_of
from tasks.tokenizer import TokenizerConfig, load_encoding
from tasks.tokenizer import run as run_tokenizer
from tasks.tokenizer.config import GPT4_PATTERN
from tasks.tokenizer.files import save_vocabulary, with_specials
from tokdata import HARD_STRINGS, dolma_documents, raw_corpus_documents, shakespeare_documents, stage_context
from tokdata import write_documents

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


def test_a_document_file_with_a_null_field_or_no_source_is_named(tmp_path, inputs):
    nulls = tmp_path / "nulls"
    nulls.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["hello", None], "source": ["s", "s"]}), nulls / "p.parquet")
    no_source = tmp_path / "no_source"
    no_source.mkdir()
    pq.write_table(pa.table({"id": ["a"], "text": ["hello"]}), no_source / "p.parquet")
    tokenizer = inputs["tokenizer"]
    for name, fields in (("plain", {}), ("mixed", {"mixture": {"s": 1.0}})):    # a mixture reads sources first
        with pytest.raises(StageError, match=r"nulls/p.parquet: row 1 \(id 'b'\): field 'text' is null"):
            shard(tmp_path, {"documents": nulls, "tokenizer": tokenizer}, name=f"nulls-{name}", **fields)
        with pytest.raises(StageError, match=r"no_source/p.parquet: cannot read .*source"):
            shard(tmp_path, {"documents": no_source, "tokenizer": tokenizer}, name=f"no-source-{name}", **fields)


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


# --- without a mixture: the output of the unmixed stage, unchanged -----------------------------------

# Digests of the output of the shard stage before mixtures existed (commit da59e59), on the input
# below: the manifest's bytes, and every row (file, row group, doc_id, source, split, tokens) in order.
UNMIXED_MANIFEST_SHA256 = "a1d2a7d0583e74f8c2c8198c23503341cf598878984e529601c7b6fef9228f0d"
UNMIXED_ROWS_SHA256 = "712a7dbdb150afede6ac8d03e0179323336d967f515766da31baa94ef8ef168a"


def byte_level_tokenizer(directory: Path) -> Path:
    directory.mkdir(parents=True)
    save_vocabulary(with_specials({bytes([b]): b for b in range(256)}, GPT4_PATTERN, ["<|endoftext|>"], "test"),
                    directory)
    return directory


def rows_digest(out: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted((out / "shards").glob("*.parquet")):
        parquet = pq.ParquetFile(path)
        for group in range(parquet.metadata.num_row_groups):
            digest.update(json.dumps([path.name, parquet.read_row_group(group).to_pylist()]).encode())
    return digest.hexdigest()


def test_without_a_mixture_the_output_is_what_it_was_before_mixtures(tmp_path):
    docs = [*shakespeare_documents()[:300], *dolma_documents()[:40],
            *[Document(f"hard/{i}", text, "hard") for i, text in enumerate(HARD_STRINGS)]]
    inputs = {"documents": write_documents(tmp_path / "docs", docs),
              "tokenizer": byte_level_tokenizer(tmp_path / "tok")}
    out, stats = shard(tmp_path, inputs, max_tokens_per_doc=2000, row_group_rows=100, target_shard_bytes=30_000)
    assert stats["shards"] == 3 and stats["docs_split"] > 0 and "mixture/target_tokens" not in stats
    assert hashlib.sha256((out / MANIFEST_FILE).read_bytes()).hexdigest() == UNMIXED_MANIFEST_SHA256
    assert rows_digest(out) == UNMIXED_ROWS_SHA256
    assert "mixture" not in json.loads((out / MANIFEST_FILE).read_text())


def test_without_a_mixture_the_fingerprint_fields_and_seed_are_those_of_the_unmixed_stage():
    assert set(ShardConfig().output_fields()) == {"val_fraction", "max_tokens_per_doc", "overlong",
                                                  "target_shard_bytes", "row_group_rows"}
    assert not SHARD_STAGE.seed_matters(ShardConfig())
    assert SHARD_STAGE.seed_matters(ShardConfig(mixture={"a": 1}))
    assert SHARD_STAGE.version == "2"


# --- source mixtures by token weight -------------------------------------------------------------------

MIX = {"shakespeare": 3, "wikitext": 1, "ccnet": 1}     # shakespeare up, wikitext down, the WARCs left out


def mixed_shard(root: Path, inputs: dict[str, Path], name: str, seed: int = 0, **fields) -> tuple[Path, dict]:
    ctx = dataclasses.replace(stage_context(root, "shard", inputs, name), seed=seed)
    return ctx.output, run(ShardConfig(**{"val_fraction": 0.1, **fields}), ctx).stats


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path]) -> tuple[Path, dict]:
    return mixed_shard(tmp_path_factory.mktemp("mixed"), inputs, "mixed", seed=7, mixture=MIX)


def train_tokens_by_source(out: Path) -> dict[str, int]:
    result = duckdb.sql(f"""select source, sum(len(tokens))::bigint from read_parquet('{out}/shards/*.parquet')
                            where split = 'train' group by source""").fetchall()
    return dict(result)


def test_a_mixture_gives_each_source_its_share_of_the_natural_training_total(mixed, sharded):
    out, stats = mixed
    natural = train_tokens_by_source(sharded[0])
    written = train_tokens_by_source(out)
    total = sum(natural.values())
    shares = {source: weight / sum(MIX.values()) for source, weight in MIX.items()}
    assert stats["mixture/target_tokens"] == total
    for source, share in shares.items():
        assert stats[f"mixture/{source}/available_tokens"] == natural[source]
        assert stats[f"mixture/{source}/target_tokens"] == round(total * share)
        assert stats[f"mixture/{source}/tokens"] == written[source]
        assert stats[f"mixture/{source}/epochs"] == pytest.approx(written[source] / natural[source])
        assert written[source] == pytest.approx(total * share, rel=0.15)     # whole documents: about, not exactly
    assert stats["mixture/shakespeare/epochs"] > 2 and stats["mixture/wikitext/epochs"] < 1
    assert set(written) == set(MIX)                                            # the WARCs give no training tokens
    assert stats["mixture/cc_warc/tokens"] == stats["mixture/cc_warc/share"] == 0
    assert sum(written.values()) == stats["tokens_train"] == pytest.approx(total, rel=0.1)


def test_the_manifest_records_the_mixture_and_the_rule_recomputes_it(mixed, sharded):
    out, stats = mixed
    manifest = ShardManifest.read(out / MANIFEST_FILE)
    assert manifest.mixture.seed == 7 and "shard-mixture:<seed>" in manifest.mixture.rule
    for source, outcome in manifest.mixture.sources.items():
        assert outcome.tokens == stats[f"mixture/{source}/tokens"]
        assert outcome.epochs == stats[f"mixture/{source}/epochs"]
    written = {}
    for row in rows(out):
        written[row["doc_id"]] = written.get(row["doc_id"], 0) + 1
    for row in rows(sharded[0]):                  # every unmixed row, written as often as the rule says
        plan = manifest.mixture.sources[row["source"]]
        epochs = plan.target_tokens / plan.available_tokens
        draw = hashlib.sha256(b"shard-mixture:7\0" + row["doc_id"].encode()).digest()
        expected = 1 if row["split"] == "val" else \
            math.floor(epochs) + (int.from_bytes(draw[:8], "big") / 2**64 < epochs - math.floor(epochs))
        copies = [written.get(row["doc_id"] if k == 0 else f"{row['doc_id']}@{k}", 0) for k in range(expected + 1)]
        assert copies == [1] * expected + [0], row["doc_id"]


def test_repeats_are_distinct_rows_of_the_same_tokens_spread_over_the_output(mixed, sharded):
    out, stats = mixed
    all_rows = rows(out)
    ids = [row["doc_id"] for row in all_rows]
    assert len(ids) == len(set(ids)) == stats["rows_out"]
    by_id = {row["doc_id"]: row for row in all_rows}
    repeats = [row for row in all_rows if "@" in row["doc_id"]]
    assert len(repeats) == stats["rows_repeated"] > 1000
    for row in repeats:
        original = by_id[row["doc_id"].rsplit("@", 1)[0]]
        assert (row["tokens"], row["source"], row["split"]) == (original["tokens"], original["source"], "train")
    first_repeat = ids.index(repeats[0]["doc_id"])
    assert all("@" not in doc_id for doc_id in ids[:first_repeat])       # round 0 first: copies are not adjacent
    asked = max(stats[f"mixture/{s}/target_tokens"] / stats[f"mixture/{s}/available_tokens"] for s in MIX)
    assert max(int(r["doc_id"].rsplit("@", 1)[1]) for r in repeats) == math.ceil(asked) - 1 > 1


def test_validation_rows_are_the_natural_split_whatever_the_mixture(mixed, sharded):
    val = {row["doc_id"]: row["tokens"] for row in rows(sharded[0]) if row["split"] == "val"}
    mixed_val = {row["doc_id"]: row["tokens"] for row in rows(mixed[0]) if row["split"] == "val"}
    assert mixed_val == val
    assert "wget_warc" in {row["source"] for row in rows(mixed[0]) if row["split"] == "val"}   # left out of the mixture


def test_every_document_of_a_mixture_is_counted(mixed, corpus):
    _, stats = mixed
    dropped = stats["dropped/shard/empty"] + stats["dropped/shard/mixture"] + stats["dropped/shard/not_in_mixture"]
    assert stats["docs_in"] == len(corpus) == stats["docs_out"] + dropped
    assert stats["dropped/shard/mixture"] > 0 and stats["dropped/shard/not_in_mixture"] > 0
    assert stats["docs_out"] == stats["docs_train"] + stats["docs_val"]


def test_a_mixture_is_seeded_and_deterministic(tmp_path, inputs, mixed):
    again, _ = mixed_shard(tmp_path, inputs, "again", seed=7, mixture=MIX, workers=1, batch_size=13)
    for path in sorted(p.relative_to(mixed[0]) for p in mixed[0].rglob("*") if p.is_file()):
        assert (again / path).read_bytes() == (mixed[0] / path).read_bytes(), path
    other, _ = mixed_shard(tmp_path, inputs, "other", seed=8, mixture=MIX)
    kept = {row["doc_id"] for row in rows(mixed[0]) if row["source"] == "wikitext"}
    assert {row["doc_id"] for row in rows(other) if row["source"] == "wikitext"} != kept


def test_mixture_tokens_sets_the_training_total_and_nested_samples(tmp_path, inputs, mixed):
    small, stats = mixed_shard(tmp_path, inputs, "small", seed=7, mixture=MIX, mixture_tokens=300_000)
    assert stats["mixture/target_tokens"] == 300_000
    assert stats["tokens_train"] == pytest.approx(300_000, rel=0.15)
    assert stats["mixture/shakespeare/epochs"] < 1
    # a smaller share keeps a subset of what a larger one kept (one draw per document)
    kept = {row["doc_id"] for row in rows(small) if row["split"] == "train"}
    assert kept <= {row["doc_id"] for row in rows(mixed[0])}


def test_weights_proportional_to_the_natural_composition_write_the_unmixed_shards(tmp_path, inputs, sharded):
    natural = train_tokens_by_source(sharded[0])
    out, stats = mixed_shard(tmp_path, inputs, "natural", seed=3, mixture=natural)
    assert all(stats[f"mixture/{source}/epochs"] == 1.0 for source in natural)
    for path in sorted(p.relative_to(out) for p in (out / "shards").rglob("*") if p.is_file()):
        assert (out / path).read_bytes() == (sharded[0] / path).read_bytes(), path
    with_mixture = json.loads((out / MANIFEST_FILE).read_text())
    assert with_mixture.pop("mixture")["target_tokens"] == sum(natural.values())
    assert with_mixture == json.loads((sharded[0] / MANIFEST_FILE).read_text())


def test_a_split_document_is_mixed_whole_and_its_repeats_keep_the_part_names(tmp_path, inputs, corpus):
    out, stats = mixed_shard(tmp_path, inputs, "parts", mixture={"wikitext": 1}, mixture_tokens=1_500_000,
                             max_tokens_per_doc=300)
    ids = {row["doc_id"] for row in rows(out) if row["source"] == "wikitext" and row["split"] == "train"}
    parts = [doc_id for doc_id in ids if "#" in doc_id and "@" not in doc_id]
    assert parts and stats["docs_split"] > 0
    for doc_id in parts:
        base = doc_id.rsplit("#", 1)[0]
        assert f"{base}#0" in ids                                         # all parts of a document, or none
        assert (f"{doc_id}@1" in ids) == (f"{base}#0@1" in ids)
    assert 2 < stats["mixture/wikitext/epochs"] < 4


def test_an_unknown_source_fails_before_encoding_naming_it_and_the_sources_there_are(tmp_path, inputs):
    with pytest.raises(StageError, match=r"shard.mixture names 'shakespear', which no document has; the documents' "
                                         r"sources are: cc_warc, ccnet, shakespeare, tricky, wget_warc, wikitext"):
        mixed_shard(tmp_path, inputs, "typo", mixture={"shakespear": 1, "ccnet": 1})
    assert not (tmp_path / "typo.scratch").exists()                        # nothing was encoded


def test_a_weighted_source_without_training_tokens_fails_naming_it(tmp_path, inputs):
    docs = write_documents(tmp_path / "docs", [Document("a/1", "some text", "a"), Document("b/1", "   ", "b")])
    with pytest.raises(StageError, match=r"gives weight to 'b', which has no training tokens"):
        mixed_shard(tmp_path, {"documents": docs, "tokenizer": inputs["tokenizer"]}, "none", mixture={"a": 1, "b": 1})


@pytest.mark.parametrize("fields, message", [
    ({"mixture": {"a": 0}}, "weights must be positive"),
    ({"mixture": {"a": -1, "b": 1}}, "weights must be positive"),
    ({"mixture": {"a": float("nan")}}, "weights must be positive"),
    ({"mixture": {"a": float("inf")}}, "weights must be positive"),
    ({"mixture": {}}, "name at least one source"),
    ({"mixture_tokens": 1000}, "mixture_tokens sizes a mixture"),
    ({"mixture": {"a": 1}, "mixture_tokens": 0}, "mixture_tokens"),
])
def test_mixture_config_errors_name_the_field(fields, message):
    with pytest.raises(ValidationError, match=message):
        ShardConfig(**fields)


def test_weights_enter_the_fingerprint_as_shares():
    def fields(**config):
        return ShardConfig(**config).output_fields()

    assert fields(mixture={"a": 1, "b": 3}) == fields(mixture={"b": 6, "a": 2})
    assert fields(mixture={"a": 1, "b": 3})["mixture"] == {"a": 0.25, "b": 0.75}
    assert fields(mixture={"a": 1, "b": 2}) != fields(mixture={"a": 1, "b": 3})
    assert fields(mixture={"a": 1}, mixture_tokens=10) != fields(mixture={"a": 1})


def test_the_pipeline_seed_enters_the_planned_shard_fingerprint_only_with_a_mixture(tmp_path):
    from flows.plan import make_plan
    from flows.recipe import PipelineConfig
    from storage.workspace import Workspace

    def shard_fingerprint(seed: int, **shard) -> str:
        ingest = {"sources": [{"name": "w", "kind": "wiki_offline"}]}
        config = PipelineConfig.model_validate({"seed": seed, "ingest": ingest, "tokenizer": {"vocab_size": 300},
                                                "shard": shard})
        return {stage.name: stage.fingerprint for stage in make_plan(config, Workspace(tmp_path))}["shard"]

    assert shard_fingerprint(1) == shard_fingerprint(2)
    assert shard_fingerprint(1, mixture={"w": 1}) != shard_fingerprint(2, mixture={"w": 1})
    assert shard_fingerprint(1, mixture={"w": 1}) != shard_fingerprint(1)
