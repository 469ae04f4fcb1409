"""The whole pipeline, ingest to pretrain, as a user runs it: one recipe, real files, real processes."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from cliutil import REPO_ROOT, catalog_rows, read_artifact, write_recipe
from test_cli import run_statuses

STAGES = ["ingest", "curate", "dedup", "tokenizer", "shard", "pretrain"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, shared_data) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    return write_recipe(root / "tiny.yaml", {
        "name": "tiny", "seed": 7,
        "ingest": {"sources": [
            {"name": "cc", "kind": "warc", "paths": [str(shared_data / "raw/*.warc.gz")]},
            {"name": "dolma", "kind": "jsonl", "paths": [str(shared_data / "raw/dolma_ccnet_cc_en_head-0091.jsonl")]},
            {"name": "wiki", "kind": "wiki_offline", "languages": ["en", "fr"], "max_docs": 600}]},
        "curate": {"executor": {"tasks": 1, "workers": 1}, "c4_quality": {"min_num_sentences": 2}},
        "dedup": {"executor": {"tasks": 1, "workers": 1}},
        "tokenizer": {"vocab_size": 512, "special_tokens": ["<|endoftext|>", "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"]},
        "shard": {"val_fraction": 0.1},
        "pretrain": {"model": {"preset": "gpt-nano"}, "batch_tokens": 512, "micro_batch": 4, "max_steps": 12,
                     "eval_every": 6, "checkpoint_every": 6, "log_every": 2, "precision": "fp32",
                     "sample": {"prompts": ["The "], "max_new_tokens": 8}},
    })


@pytest.fixture(scope="module")
def built(recipe, prefect_api) -> Path:
    from cliutil import run_cli

    ws = recipe.parent / "ws"
    out = run_cli(["run", str(recipe), "-w", str(ws)])
    assert out.returncode == 0, out.stderr[-4000:]
    assert run_statuses(out.stdout) == {stage: "built" for stage in STAGES}
    return ws


def test_every_stage_builds_then_every_stage_is_cached(recipe, built, cli):
    again = cli(["run", str(recipe), "-w", str(built)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert run_statuses(again.stdout) == {stage: "cached" for stage in STAGES}
    rows = catalog_rows(built, "select stage, cached from stage_runs where cached order by started_at")
    assert [r[0] for r in rows] == STAGES


def test_the_funnel_adds_up_in_the_catalog(built):
    rows = catalog_rows(built, """
        select stage, max(value) filter (name = 'docs_in') as docs_in,
               max(value) filter (name = 'docs_out') as docs_out,
               coalesce(sum(value) filter (name like 'dropped/%'), 0) as dropped
        from stage_stats group by stage order by stage""")
    by_stage = {stage: (docs_in, docs_out, dropped) for stage, docs_in, docs_out, dropped in rows}
    for stage in ("ingest", "curate", "dedup", "shard"):
        docs_in, docs_out, dropped = by_stage[stage]
        assert docs_in == docs_out + dropped, stage
    assert by_stage["curate"][0] == by_stage["ingest"][1]     # each stage reads what the previous one wrote
    assert by_stage["curate"][2] > 0                          # French pages and boilerplate are dropped
    tokens = catalog_rows(built, "select split, sum(len(tokens)) from token_shards group by split order by split")
    assert [t[0] for t in tokens] == ["train", "val"] and all(t[1] > 0 for t in tokens)


def test_mlflow_shows_nested_stage_runs_and_the_loss_curve(built):
    client = MlflowClient(f"sqlite:///{built / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][-1]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["lmforge.stage"] for r in children) == sorted(STAGES)
    pretrain = next(r for r in children if r.data.tags["lmforge.stage"] == "pretrain")
    losses = [m.value for m in client.get_metric_history(pretrain.info.run_id, "loss")]
    assert len(losses) >= 5 and losses[-1] < losses[0]
    assert client.get_metric_history(pretrain.info.run_id, "val_ppl")
    assert {a.path for a in client.list_artifacts(pretrain.info.run_id)} >= {"model", "samples.txt"}


def readme_catalog_queries() -> list[str]:
    """The SQL of every `lmforge catalog "..."` line in the README's "Querying the catalog"."""
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("### Querying the catalog")
    section = text[start:text.index("\n## ", start)]
    return [shlex.split(line)[2] for line in re.findall(r"^lmforge catalog .*$", section, flags=re.MULTILINE)]


def test_the_readme_catalog_queries_run_and_return_rows(built):
    """A newcomer pastes them: each must run on a built workspace and show something (one that found
    nothing anywhere, `name like 'bad/%'` on clean files, read as a broken catalog)."""
    queries = readme_catalog_queries()
    assert len(queries) >= 7
    for sql in queries:
        assert catalog_rows(built, sql), sql


def stage_prefixes(ws: Path, stage: str) -> tuple[str, ...]:
    """Artifact description prefixes of every build of `stage` in this workspace."""
    return tuple(f"{stage} {p.name}" for p in (ws / "stages" / stage).iterdir() if p.is_dir())


def test_the_run_publishes_prefect_artifacts(built):
    kind, funnel = read_artifact("curate-stats", stage_prefixes(built, "curate"))
    assert kind == "table" and any(row["counter"].startswith("funnel/") for row in funnel)
    kind, training = read_artifact("pretrain-training", stage_prefixes(built, "pretrain"))
    assert kind == "table" and training[-1]["step"] == 12 and "val_loss" in training[-1]
    kind, links = read_artifact("mlflow-runs", "tiny: ")
    assert kind == "markdown" and "- pretrain: [" in links and "/#/experiments/" in links


def test_a_recipe_switch_trains_bert_on_the_same_shards(recipe, built, cli):
    out = cli(["run", str(recipe), "-w", str(built), "--set", "pretrain.model.preset=bert-nano",
               "--set", "pretrain.model.arch=bert"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert run_statuses(out.stdout) == {**{s: "cached" for s in STAGES[:-1]}, "pretrain": "built"}
    bert_dirs = [p for p in (built / "stages/pretrain").iterdir() if json.loads(
        (p / "model/config.json").read_text()).get("arch") == "bert"]
    assert len(bert_dirs) == 1
