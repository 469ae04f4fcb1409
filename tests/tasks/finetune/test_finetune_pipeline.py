"""finetune in a real pipeline run through the CLI: stats in the catalog, a nested MLflow run per task under the
stage's run, the GLUE table as MLflow and Prefect artifacts, and a cached rerun."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.stages import catalog_views
from storage.catalog import Catalog

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"


@pytest.fixture(scope="module")
def built(tmp_path_factory, prefect_api) -> tuple[Path, Path, str]:
    from cliutil import run_cli

    root = tmp_path_factory.mktemp("pipeline")
    recipe = root / "ft.yaml"
    recipe.write_text(json.dumps({      # JSON is YAML
        "name": "ft", "seed": 3,
        "ingest": {"sources": [{"name": "wiki", "kind": "wiki_offline", "languages": ["en"], "max_docs": 800}]},
        "tokenizer": {"vocab_size": 512, "special_tokens": ["<|endoftext|>", "[CLS]", "[SEP]", "[MASK]", "[PAD]",
                                                            "[UNK]"]},
        "shard": {"val_fraction": 0.05},
        "pretrain": {"model": {"preset": "gpt-nano"}, "batch_tokens": 1024, "micro_batch": 8, "max_steps": 10,
                     "eval_every": 0, "checkpoint_every": 0, "precision": "fp32",
                     "sample": {"prompts": ["The "], "max_new_tokens": 4}},
        "finetune": {"precision": "fp32", "tasks": [
            {"name": "sst2", "kind": "glue", "train": str(DATA / "glue/sst2/train.head5000.tsv"),
             "eval": str(DATA / "glue/sst2/dev.tsv"), "max_train_examples": 64, "max_eval_examples": 32, "epochs": 1},
            {"name": "rte", "kind": "glue", "train": str(DATA / "glue/rte/train.tsv"),
             "eval": str(DATA / "glue/rte/dev.tsv"), "max_train_examples": 32, "max_eval_examples": 16, "epochs": 1}]},
    }))
    ws = root / "ws"
    out = run_cli(["run", str(recipe), "-w", str(ws)])
    assert out.returncode == 0, out.stderr[-4000:]
    return recipe, ws, out.stdout


def catalog(ws: Path, sql: str) -> list[tuple]:
    return Catalog(ws / "catalog.duckdb").query(sql, catalog_views())[1]


def test_scores_are_stage_stats_in_the_catalog(built):
    _, ws, stdout = built
    assert any(line.split()[:1] == ["finetune"] and "built" in line for line in stdout.splitlines())
    rows = dict(catalog(ws, "select name, value from stage_stats where stage = 'finetune'"))
    assert 0 <= rows["sst2/accuracy"] <= 1 and 0 <= rows["rte/accuracy"] <= 1 and rows["sst2/train_examples"] == 64
    output = Path(catalog(ws, "select output_dir from stage_runs where stage = 'finetune'")[0][0])
    assert json.loads((output / "sst2/metrics.json").read_text())["accuracy"] == rows["sst2/accuracy"]


def test_each_task_is_a_nested_mlflow_run_of_the_stage_run(built):
    _, ws, _ = built
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    stage = next(r for r in runs if r.data.tags.get("lmforge.stage") == "finetune"
                 and "lmforge.task" not in r.data.tags)
    tasks = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == stage.info.run_id]
    assert sorted(r.data.tags["lmforge.task"] for r in tasks) == ["rte", "sst2"]
    assert all(r.info.status == "FINISHED" and "accuracy" in r.data.metrics for r in tasks)
    assert stage.data.metrics["sst2/accuracy"] == next(r for r in tasks if r.data.tags["lmforge.task"] == "sst2") \
        .data.metrics["accuracy"]
    assert "glue_table.md" in {a.path for a in client.list_artifacts(stage.info.run_id)}


def test_the_glue_table_is_a_prefect_markdown_artifact(built):
    from cliutil import read_artifact

    kind, markdown = read_artifact("finetune-glue")
    assert kind == "markdown" and "| SST-2 |" in markdown and "| RTE |" in markdown


def test_a_rerun_reuses_the_finetune_output(built, cli):
    recipe, ws, _ = built
    again = cli(["run", str(recipe), "-w", str(ws)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert any(line.split()[:1] == ["finetune"] and "cached" in line for line in again.stdout.splitlines())
