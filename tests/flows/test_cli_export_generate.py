"""The evaluate stage in a real pipeline run, then `lmforge export` and `lmforge generate` on its model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cliutil import catalog_rows, run_cli, write_recipe
from mlflow.tracking import MlflowClient
from test_cli import run_statuses

STAGES = ["ingest", "tokenizer", "shard", "pretrain", "evaluate"]
SPECIALS = ["<|endoftext|>", "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, shared_data) -> Path:
    root = tmp_path_factory.mktemp("evalpipe")
    arc = shutil.copy(shared_data / "multiple_choice/arc_easy/ARC-Easy-Dev.jsonl", root / "arc.jsonl")
    mc = shared_data / "multiple_choice"
    return write_recipe(root / "evalpipe.yaml", {
        "name": "evalpipe", "seed": 5,
        "ingest": {"sources": [{"name": "wiki", "kind": "wiki_offline", "languages": ["en"], "max_docs": 400}]},
        "tokenizer": {"vocab_size": 512, "special_tokens": SPECIALS},
        "shard": {"val_fraction": 0.1},
        "pretrain": {"model": {"preset": "gpt-nano"}, "batch_tokens": 512, "micro_batch": 4, "max_steps": 12,
                     "optim": {"warmup_steps": 2},
                     "eval_every": 0, "checkpoint_every": 0, "log_every": 2, "precision": "fp32",
                     "sample": {"prompts": ["The "], "max_new_tokens": 8}},
        "evaluate": {"heldout": {"files": [str(shared_data / "raw/wikitext-2_test.txt")], "max_chars": 5000},
                     "tasks": [{"name": "arc_easy", "format": "arc", "path": str(arc), "limit": 8},
                               {"name": "winogrande", "format": "winogrande", "path": str(mc / "winogrande/dev.jsonl"),
                                "limit": 8, "num_fewshot": 1},
                               {"name": "unscramble", "format": "unscramble", "limit": 8, "num_fewshot": 2,
                                "path": str(shared_data / "raw/wikitext-2_test.txt")}]},
    })


@pytest.fixture(scope="module")
def built(recipe, prefect_api) -> Path:
    ws = recipe.parent / "ws"
    out = run_cli(["run", str(recipe), "-w", str(ws)])
    assert out.returncode == 0, out.stderr[-4000:]
    assert run_statuses(out.stdout) == {stage: "built" for stage in STAGES}
    return ws


def stage_dir(ws: Path, stage: str) -> Path:
    return next(p for p in (ws / "stages" / stage).iterdir() if (p / "_SUCCESS.json").is_file())


def test_evaluate_results_reach_the_catalog_mlflow_and_a_prefect_table(built):
    stats = dict(catalog_rows(built, "select name, value from stage_stats where stage = 'evaluate'"))
    assert {"arc_easy/acc_norm", "arc_easy/centered", "winogrande/acc", "unscramble/exact_match", "aggregate/core",
            "heldout/wikitext-2_test.txt/bpb"} <= set(stats)
    assert stats["aggregate/core"] == pytest.approx(
        (stats["arc_easy/centered"] + stats["winogrande/centered"] + stats["unscramble/centered"]) / 3)
    client = MlflowClient(f"sqlite:///{built / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    evaluate = next(r for r in runs if r.data.tags.get("lmforge.stage") == "evaluate")
    assert evaluate.data.metrics["aggregate/core"] == pytest.approx(stats["aggregate/core"])
    assert evaluate.data.metrics["heldout/wikitext-2_test.txt/bpb"] == pytest.approx(
        stats["heldout/wikitext-2_test.txt/bpb"])
    assert "results.json" in {a.path for a in client.list_artifacts(evaluate.info.run_id)}

    from cliutil import read_artifact

    kind, table = read_artifact("evaluate-results")
    assert kind == "table" and [row["name"] for row in table] == [
        "heldout/wikitext-2_test.txt", "arc_easy", "winogrande", "unscramble", "aggregate"]


def plan_statuses(recipe: Path, ws: Path) -> dict[str, str]:
    out = run_cli(["plan", str(recipe), "-w", str(ws)])
    statuses = {line.split()[0]: line.split()[-1] for line in out.stdout.splitlines()[1:]}
    return {stage: statuses[stage] for stage in STAGES}     # the others say "not in recipe"


def test_the_plan_sees_a_changed_task_file(recipe, built):
    assert plan_statuses(recipe, built) == {stage: "cached" for stage in STAGES}
    arc = recipe.parent / "arc.jsonl"
    original = arc.read_text()
    try:
        arc.write_text(original.replace("cellular telephone", "mobile telephone"))
        assert plan_statuses(recipe, built) == {**{stage: "cached" for stage in STAGES[:-1]}, "evaluate": "pending"}
    finally:
        arc.write_text(original)


def test_export_finds_the_tokenizer_through_the_workspace_and_transformers_loads_the_folder(built, tmp_path):
    import transformers   # the test extra: a missing one fails here, never skips
    import torch

    from tasks.models import load_pretrained

    pretrain = stage_dir(built, "pretrain")
    out = run_cli(["export", str(pretrain), "--format", "hf", str(tmp_path / "hf")])
    assert out.returncode == 0 and out.stdout.strip() == f"exported {tmp_path / 'hf'}", out.stderr
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours, spec = load_pretrained(pretrain, "cpu", stage_dir(built, "tokenizer"))
    ids = tokenizer("The history of the city began in 1990, when", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits[..., : spec.vocab_size]).abs().max() < 1e-4
    again = run_cli(["export", str(pretrain), "--format", "hf", str(tmp_path / "hf")])
    assert again.returncode == 1 and "exists and is not an empty folder" in again.stderr


def test_generate_prints_a_continuation_streamed_from_the_model(built, tmp_path):
    pretrain = str(stage_dir(built, "pretrain"))
    first = run_cli(["generate", pretrain, "--prompt", "The city of", "--max-new-tokens", "24", "--seed", "3"])
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("The city of") and len(first.stdout.strip()) > len("The city of") + 5
    assert run_cli(["generate", pretrain, "--prompt", "The city of", "--max-new-tokens", "24",
                    "--seed", "3"]).stdout == first.stdout
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A new product:\nIn 1990,\n")
    out = run_cli(["generate", pretrain, "--prompts-file", str(prompts), "--format", "jsonl", "--temperature", "0",
                   "--max-new-tokens", "10"])
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["A new product:", "In 1990,"] and all(r["text"] for r in rows)
    assert all(r["stop"] in ("eot", "length") and 0 < r["tokens"] <= 10 for r in rows)


@pytest.mark.parametrize("args, message", [
    (["generate", "{pretrain}"], "nothing to continue: give --prompt TEXT or --prompts-file FILE"),
    (["generate", "{pretrain}", "--prompt", "x", "--format", "xml"], "--format 'xml': expected text or jsonl"),
    (["export", "{pretrain}", "--format", "onnx", "{tmp}/out"], "--format 'onnx': lmforge exports hf"),
    (["generate", "{tmp}", "--prompt", "x"], "holds neither model.safetensors + config.json nor a model/ folder"),
])
def test_cli_errors_are_one_line(built, tmp_path, args, message):
    filled = [a.format(pretrain=stage_dir(built, "pretrain"), tmp=tmp_path) for a in args]
    out = run_cli(filled)
    assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr


def test_help_lists_export_and_generate():
    out = run_cli(["--help"])
    assert "export" in out.stdout and "generate" in out.stdout
    assert "--prompts-file" in run_cli(["generate", "--help"]).stdout
    assert "--tokenizer" in run_cli(["export", "--help"]).stdout
