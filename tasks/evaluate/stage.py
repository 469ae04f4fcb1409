"""The evaluate stage: load the model and its tokenizer, score held-out text and every task, write and aggregate.

Output:

    heldout.json                     per file: bpb, loss, ppl, tokens, bytes (BERT: mlm_loss, mlm_ppl)
    <task>/metrics.json              storage.formats.TaskMetrics, the official metric first
    <task>/predictions.jsonl         per item: id, context, continuations, loglikelihoods, greedy, prediction, gold
    <task>/task.json                 how the task was scored: file, format, k-shot, limit, skipped rows, rules
    results.json                     everything above in one place, and the aggregate

Stats: `<task>/<metric>`, `<task>/dropped/<reason>`, `aggregate/core`, `heldout/<file>/<metric>`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from storage.formats import TaskMetrics, write_predictions
from storage.stage import StageContext, StageError, StageResult
from tasks.datasets.base import DatasetError
from tasks.datasets.multiple_choice import ChoiceItem, TaskFile, read_choice_file
from tasks.evaluate import heldout, unscramble
from tasks.evaluate.config import EvaluateConfig, TaskSpec
from tasks.evaluate.prompts import FEWSHOT_DELIMITER
from tasks.evaluate.scoring import Scorer
from tasks.evaluate.suite import LM, OFFICIAL, score_generate_task, score_loglikelihood_task
from tasks.models import load_pretrained
from tasks.tokenizer import load_encoding
from tasks.training.runtime import choose_device, resolve_precision

RESULTS_FILE, HELDOUT_FILE = "results.json", "heldout.json"
NOT_APPLICABLE = ("BERT has no left-to-right likelihood: multiple-choice and generative tasks need a GPT "
                  "(the held-out masked-LM loss is reported instead)")


def run(config: EvaluateConfig, ctx: StageContext) -> StageResult:
    """Scores `ctx.inputs['pretrain']` with the tokenizer of `ctx.inputs['tokenizer']`."""
    for key in ("pretrain", "tokenizer"):
        if key not in ctx.inputs:
            raise StageError(f"evaluate needs the {key} stage's output: ctx.inputs has no {key!r} entry")
    device, precision = _device(config)
    model, spec = load_pretrained(ctx.inputs["pretrain"], device, ctx.inputs["tokenizer"])
    encoding = load_encoding(Path(ctx.inputs["tokenizer"]))
    lm = LM(Scorer(model, spec, device, precision, config.batch_tokens), encoding)
    result = StageResult()
    summary: dict[str, Any] = {"model": {"arch": spec.arch, "seq_len": spec.seq_len, "vocab_size": spec.vocab_size},
                               "device": device.type, "precision": precision, "seed": config.seed}
    summary["heldout"] = _heldout(config, lm, result, ctx.output)
    summary["tasks"] = {task.name: _task(task, config, lm, result, ctx.output) for task in config.tasks}
    summary["aggregate"] = _aggregate(summary["tasks"], result)
    _write_json(ctx.output / RESULTS_FILE, summary)
    _publish(summary, ctx)
    return result


def _device(config: EvaluateConfig) -> tuple[torch.device, str]:
    try:
        device = choose_device(config.device, 0)
    except RuntimeError as err:
        raise StageError(f"evaluate: {err}") from None
    wanted = config.precision if config.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return device, resolve_precision(wanted, device)


# ---- held-out text --------------------------------------------------------------------------


def _heldout(config: EvaluateConfig, lm: LM, result: StageResult, output: Path) -> dict[str, dict[str, float]]:
    stride = _stride(config, lm)                      # checked before any file is scored
    found = {}
    for path in config.heldout.files:
        name = Path(path).name
        text = heldout.read_text(path, config.heldout.max_chars)
        found[name] = _heldout_file(config, lm, text, name, stride)
        for metric, value in found[name].items():
            result.count(f"heldout/{name}/{metric}", value)
    if found:
        _write_json(output / HELDOUT_FILE, {"stride": stride, "max_chars": config.heldout.max_chars, "files": found})
    return found


def _heldout_file(config: EvaluateConfig, lm: LM, text: str, name: str, stride: int | None) -> dict[str, float]:
    scorer = lm.scorer
    if stride is None:                                # a BERT (see _stride)
        return heldout.masked_lm(scorer.model, scorer.spec, lm.encoding, text, f"evaluate-mlm:{config.seed}:{name}",
                                 scorer.device, scorer.precision, scorer.batch_tokens)
    return heldout.causal_lm(scorer, lm.encoding, text, stride)


def _stride(config: EvaluateConfig, lm: LM) -> int | None:
    """Tokens between a GPT's window starts; None for a BERT, whose masked-LM windows do not overlap.

    A BERT ignores `heldout.stride` rather than refusing it: one recipe serves both architectures
    (`--set pretrain.model.arch=bert`)."""
    spec = lm.scorer.spec
    if spec.arch == "bert":
        return None
    seq_len = spec.seq_len
    stride = config.heldout.stride or seq_len
    if stride > seq_len:
        raise StageError(f"heldout.stride={stride} exceeds the model's seq_len {seq_len}; tokens between "
                         "windows would go unscored")
    return stride


# ---- tasks -----------------------------------------------------------------------------------


def _task(task: TaskSpec, config: EvaluateConfig, lm: LM, result: StageResult, output: Path) -> dict[str, Any]:
    """Scores one task, writes its folder, adds its stats; returns its summary."""
    folder = output / task.name
    folder.mkdir()
    if lm.scorer.spec.arch != "gpt":
        result.count(f"{task.name}/not_applicable")
        _write_json(folder / "task.json", {**_describe(task), "applicable": False, "reason": NOT_APPLICABLE})
        return {"applicable": False, "reason": NOT_APPLICABLE}
    items, pool, read = _load(task, config, result)
    scored = score_generate_task(task, items, lm, config.seed) if task.kind == "generate" else \
        score_loglikelihood_task(task, items, pool, lm, config.seed)
    for reason, count in scored.dropped.items():
        result.count(f"{task.name}/dropped/{reason}", count)
    if not scored.examples:
        raise StageError(f"task {task.name!r}: no item of {task.path} could be scored ({dict(scored.dropped)})")
    metrics = TaskMetrics(scored.metrics)
    metrics.write(folder / "metrics.json")
    write_predictions(folder / "predictions.jsonl", scored.rows)
    for name, value in metrics.stats(task.name).items():
        result.count(name, value)
    _write_json(folder / "task.json", {**_describe(task), "applicable": True, **read,
                                       "skipped_while_scoring": dict(scored.dropped), "examples": scored.examples})
    return {"applicable": True, "metrics": scored.metrics}


def _load(task: TaskSpec, config: EvaluateConfig, result: StageResult) -> tuple[list[ChoiceItem], list[ChoiceItem],
                                                                              dict[str, Any]]:
    """(items, demonstration pool, what reading found); skipped rows are counted and listed."""
    if task.kind == "generate":
        items = unscramble.unscramble_items(task.path, config.seed)
        return items, items, {"rows_read": len(items), "usable_items": len(items), "skipped_rows": {}}
    data = _read(task.format, task.path, task.labels, task.name, result)
    pool = _read(task.format, task.fewshot_path, task.fewshot_labels, task.name, result).items \
        if task.fewshot_path else data.items
    skipped = {reason: sum(b.reason == reason for b in data.bad) for reason in sorted({b.reason for b in data.bad})}
    return data.items, pool, {"rows_read": data.rows, "usable_items": len(data.items), "skipped_rows": skipped}


def _read(format: str, path: str, labels: str | None, task: str, result: StageResult) -> TaskFile:
    try:
        data = read_choice_file(format, path, labels)
    except DatasetError as err:
        raise StageError(f"task {task!r}: {err}") from None
    for bad in data.bad:
        result.count(f"{task}/dropped/{bad.reason}")
        result.bad(bad.path, bad.reason, bad.detail, where=f"line {bad.line}")
    return data


def _describe(task: TaskSpec) -> dict[str, Any]:
    """How the task is scored, for task.json (recompute any number from predictions.jsonl with it)."""
    rules = {"choice": "acc: argmax of loglikelihoods; acc_norm: argmax of loglikelihood / len(choice), choice = "
                       "the continuation without its leading target delimiter ' ', in characters",
             "schema": "acc: argmax of loglikelihoods (one continuation after each option-filled context)",
             "cloze": "acc: greedy[0] (every token of the target is the argmax); ppl: exp(-mean loglikelihood); "
                      "prediction: the argmax token at each target position (given the target's earlier tokens)",
             "generate": "exact_match: prediction (greedy text up to the first newline, stripped) == gold"}
    delimiter = unscramble.DELIMITER if task.kind == "generate" else FEWSHOT_DELIMITER
    return {"task": task.name, "format": task.format, "kind": task.kind, "official_metric": OFFICIAL[task.kind],
            "path": task.path, "labels": task.labels, "num_fewshot": task.num_fewshot,
            "fewshot_pool": task.fewshot_path or task.path, "fewshot_delimiter": delimiter, "limit": task.limit,
            "scoring": rules[task.kind], "centered": "(official - chance) / (1 - chance); chance = mean 1/choices"}


# ---- aggregate, files, Prefect ---------------------------------------------------------------


def _aggregate(tasks: dict[str, dict[str, Any]], result: StageResult) -> dict[str, Any]:
    """DCLM's CORE style: the mean of the tasks' chance-centred official metrics."""
    centered = {name: task["metrics"]["centered"] for name, task in tasks.items() if task["applicable"]}
    if not centered:
        return {"core": None, "reason": "no applicable task" if tasks else "no task in the recipe"}
    core = sum(centered.values()) / len(centered)
    result.count("aggregate/core", core)
    result.count("aggregate/tasks", len(centered))
    return {"core": core, "centered": centered}


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _publish(summary: dict[str, Any], ctx: StageContext) -> None:
    """The results table as a Prefect artifact (inside a Prefect task run), results.json into MLflow."""
    _prefect_table(summary)
    if ctx.mlflow_tracking_uri and ctx.mlflow_run_id:
        from mlflow.tracking import MlflowClient

        from tasks.training.reporting import note

        try:
            MlflowClient(ctx.mlflow_tracking_uri).log_artifact(ctx.mlflow_run_id, str(ctx.output / RESULTS_FILE))
        except Exception as exc:   # the stage output holds the same file
            note(f"could not log {RESULTS_FILE} to MLflow ({type(exc).__name__}: {exc})", "evaluate")


def results_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task, held-out file and the aggregate: what a user sorts ablations by."""
    rows = [{"name": f"heldout/{name}", "metric": next(iter(values)), "value": next(iter(values.values())),
             "centered": None, "examples": None} for name, values in summary["heldout"].items()]
    for name, task in summary["tasks"].items():
        if not task["applicable"]:
            rows.append({"name": name, "metric": "not applicable", "value": None, "centered": None, "examples": None})
            continue
        official, value = next(iter(task["metrics"].items()))
        rows.append({"name": name, "metric": official, "value": value, "centered": task["metrics"]["centered"],
                     "examples": int(task["metrics"]["examples"])})
    if summary["aggregate"]["core"] is not None:
        rows.append({"name": "aggregate", "metric": "core", "value": summary["aggregate"]["core"],
                     "centered": None, "examples": None})
    return rows


def _prefect_table(summary: dict[str, Any]) -> None:
    from prefect.artifacts import create_table_artifact
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None:
        return
    create_table_artifact(results_table(summary), key="evaluate-results",
                          description="evaluate: held-out bits per byte, task metrics, the CORE-style aggregate")
