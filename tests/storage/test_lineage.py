"""Where the documents ran out: real stage outputs committed into a real workspace, walked back."""
from __future__ import annotations

from pathlib import Path

import pytest

import tasks.curate as curate
import tasks.dedup as dedup
import tasks.shard as shard
import tasks.tokenizer as tokenizer
from storage.documents import document_files
from storage.formats import ShardManifest
from storage.lineage import drop_summary, empty_input_message, where_emptied
from storage.stage import StageContext, StageError
from storage.workspace import Workspace
from tasks.ingest import IngestConfig
from tasks.ingest import run as run_ingest
from tasks.tokenizer.files import save_vocabulary, with_specials

DOCS = 40


def build(ws: Workspace, stage: str, fp: str, run, config, inputs: dict[str, tuple[str, str]],
          record_stages: bool = True) -> Path:
    """Runs a stage into a temp dir and commits it the way flows/runner.py does; returns its output dir."""
    ctx = StageContext(stage, fp, ws.new_temp_dir(stage, fp), ws.scratch_dir(stage, fp),
                       {key: ws.stage_dir(up, up_fp) for key, (up, up_fp) in inputs.items()}, ws.root, seed=1)
    result = run(config, ctx)
    record = {"stats": result.stats, "input_fingerprints": {key: up_fp for key, (_, up_fp) in inputs.items()}}
    if record_stages:
        record["input_stages"] = {key: up for key, (up, _) in inputs.items()}
    return ws.commit(stage, fp, ctx.output, record)


@pytest.fixture(scope="module")
def emptied(tmp_path_factory) -> Workspace:
    """English wiki summaries, curated for German (the easy mistake), then dedup: both commit empty outputs."""
    ws = Workspace.at(tmp_path_factory.mktemp("ws"))
    ingest = IngestConfig.model_validate({"sources": [{"name": "wiki", "kind": "wiki_offline", "max_docs": DOCS}]})
    build(ws, "ingest", "i" * 12, run_ingest, ingest, {})
    german = curate.CurateConfig(language={"languages": ["de"]}, url_filter={"enabled": False}, executor={"tasks": 2})
    build(ws, "curate", "c" * 12, curate.run, german, {"documents": ("ingest", "i" * 12)})
    # an older record without `input_stages`: its upstream is found by fingerprint
    build(ws, "dedup", "d" * 12, dedup.run, dedup.DedupConfig(executor={"tasks": 2}),
          {"documents": ("curate", "c" * 12)}, record_stages=False)
    return ws


def test_curate_and_dedup_commit_empty_outputs_with_consistent_stats(emptied):
    curated = emptied.read_success("curate", "c" * 12)["stats"]
    assert curated["docs_in"] == DOCS and curated["docs_out"] == 0
    assert sum(v for k, v in curated.items() if k.startswith("dropped/")) == DOCS
    assert emptied.read_success("dedup", "d" * 12)["stats"]["docs_in"] == 0
    assert document_files(emptied.stage_dir("dedup", "d" * 12)) == []


def test_training_a_tokenizer_on_nothing_names_curate_and_its_drops_in_one_line(emptied):
    with pytest.raises(StageError) as err:
        build(emptied, "tokenizer", "t" * 12, tokenizer.run, tokenizer.TokenizerConfig(vocab_size=300),
              {"documents": ("dedup", "d" * 12)})
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"tokenizer cannot train: no documents left: curate kept 0 of {DOCS} documents; "
                              f"largest drops: language {DOCS} (en ")


def test_a_pretrained_tokenizer_and_shard_pass_the_emptiness_on_to_pretrain(emptied, tmp_path):
    vocab_dir = tmp_path / "bytes"
    vocab_dir.mkdir()
    save_vocabulary(with_specials({bytes([b]): b for b in range(256)}, r"[\s\S]", ["<|endoftext|>"], "test"), vocab_dir)
    build(emptied, "tokenizer", "p" * 12, tokenizer.run, tokenizer.TokenizerConfig(pretrained=str(vocab_dir)),
          {"documents": ("dedup", "d" * 12)})
    shard_dir = build(emptied, "shard", "s" * 12, shard.run, shard.ShardConfig(),
                      {"documents": ("dedup", "d" * 12), "tokenizer": ("tokenizer", "p" * 12)})
    assert ShardManifest.read(shard_dir / "manifest.json").total_tokens == 0
    assert where_emptied(shard_dir).stage == "curate"
    message = empty_input_message(shard_dir, "tokens")
    assert message.startswith(f"no tokens left: curate kept 0 of {DOCS} documents; largest drops: language {DOCS}")


def test_outside_a_workspace_the_message_still_says_what_is_missing(tmp_path):
    assert where_emptied(tmp_path) is None
    assert empty_input_message(tmp_path) == (f"no documents left: {tmp_path} holds none, and no upstream "
                                             "_SUCCESS.json records a stage that dropped them")


def test_drop_summary_orders_steps_then_reasons():
    stats = {"docs_in": 100, "docs_out": 0, "dropped/language/es": 30, "dropped/language/fr": 20,
             "dropped/language/en": 5, "dropped/language/it": 1, "dropped/c4_quality/too_few_sentences": 40,
             "dropped/read/empty_text": 4, "dropped/pii/none": 0, "funnel/03_language/wiki/in": 100}
    assert drop_summary(stats) == ("language 56 (es 30, fr 20, en 5, ...), c4_quality 40 (too_few_sentences 40), "
                                   "read 4 (empty_text 4)")
