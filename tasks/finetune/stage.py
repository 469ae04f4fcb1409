"""The finetune stage: for every task, read, encode, train, predict, score and write what a scorer needs.

    <output>/<task>/metrics.json         official metric(s) first (`storage.formats.TaskMetrics`)
    <output>/<task>/predictions.jsonl    {id, prediction, gold} per evaluation example
    <output>/<task>/predictions.json     SQuAD: the official {question id: answer} (+ null_odds.json for v2)
    <output>/<task>/model/               the fine-tuned model (`tasks.finetune.checkpoint`)
    <output>/<task>/task.json            resolved hyperparameters, sizes, bad rows, notes
    <output>/<task>/learning_curve.jsonl the loop's metrics (train loss per step, validation loss per epoch)
    <output>/<task>/curve.md, sample_efficiency.png   with `sample_efficiency`
    <output>/glue_table.md               when GLUE tasks ran (also an MLflow and a Prefect artifact)

An evaluation mapping `{m: file, mm: file}` writes `<task>-m/` and `<task>-mm/` from one trained model.
Every metric is also a stat `<set>/<metric>`. The tokenizer must match the model, else nothing trains.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.formats import ModelSpec, TaskMetrics, TokenizerFile, write_predictions
from storage.stage import StageContext, StageError, StageResult
from tasks.finetune import runs
from tasks.finetune.config import FinetuneConfig, TaskConfig
from tasks.finetune.data import BadRowCounter, TaskData, load_task, subset_order, take_fraction
from tasks.finetune.encode import Specials, make_layout
from tasks.finetune.features import Features
from tasks.finetune.model import HeadSpec, head_kind
from tasks.finetune.predict import Predictions, decode, feature_logits
from tasks.finetune.prepare import Prepared, Preparer, QaSettings
from tasks.finetune.report import TaskRuns, curve_png, curve_table, glue_table, publish_markdown
from tasks.finetune.score import prediction_rows, score, sentiment_index
from tasks.models import CONFIG_FILE
from tasks.models.pretrained import check_tokenizer, model_directory
from tasks.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG
from tasks.tokenizer import load_encoding
from tasks.training.launch import exclusive
from tasks.training.loop import link_or_copy
from tasks.training.reporting import METRICS_FILE, note

VOCAB_MULTIPLE = 128                 # rows added at once when task tokens need room (as pretrain pads)
GPT_TOKENS = ("start", "delim", "extract")


@dataclass
class Inputs:
    """What every task shares: the pretrained model, its tokenizer, the task-token ids."""

    model_dir: Path
    spec: ModelSpec
    encoding: Any
    specials: Specials
    extra_rows: int


@dataclass
class RunResult:
    """One run's scores per evaluation set, and the predictions behind them."""

    metrics: dict[str, dict[str, float]]
    predictions: dict[str, Predictions]
    model_dir: Path
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    """One task, read and encoded, with everything its runs share."""

    task: TaskConfig
    config: FinetuneConfig
    inputs: Inputs
    ctx: StageContext
    data: TaskData
    hyper: runs.Hyper
    head: HeadSpec
    train: Prepared
    evals: dict[str, Prepared]


def run(config: FinetuneConfig, ctx: StageContext) -> StageResult:
    inputs = read_inputs(config, ctx)
    result, glue = StageResult(), {"results": {}, "sizes": {}}
    tracker = TaskRuns(ctx.mlflow_tracking_uri, ctx.mlflow_run_id)
    with exclusive(ctx.scratch, "finetune"):
        for task in config.tasks:
            for key, values in run_task(task, config, inputs, ctx, result, tracker).items():
                glue[key].update(values)
    if glue["results"]:
        write_glue_table(glue, inputs.spec, config.init, ctx.output, tracker)
    return result


# ---- shared inputs --------------------------------------------------------------------------


def read_inputs(config: FinetuneConfig, ctx: StageContext) -> Inputs:
    """The pretrained model's shape and the tokenizer, refused before any training if they disagree."""
    for key in ("pretrain", "tokenizer"):
        if key not in ctx.inputs:
            raise StageError(f"finetune needs the {key} stage's output: ctx.inputs has no {key!r} entry")
    model_dir = model_directory(Path(ctx.inputs["pretrain"]))
    spec = ModelSpec.read(model_dir / CONFIG_FILE)
    refuse_gpt_fields(config, spec)
    tokenizer_dir = Path(ctx.inputs["tokenizer"])
    check_tokenizer(spec, model_dir / CONFIG_FILE, tokenizer_dir)
    tokenizer = TokenizerFile.read(tokenizer_dir / TOKENIZER_CONFIG)
    specials, extra_rows = task_specials(spec, tokenizer, config)
    return Inputs(model_dir, spec, load_encoding(tokenizer_dir), specials, extra_rows)


def refuse_gpt_fields(config: FinetuneConfig, spec: ModelSpec) -> None:
    """GPT-1's knobs (task tokens, the auxiliary LM loss) set for a BERT would change nothing: refused, named."""
    if spec.arch != "bert":
        return
    given = [f"task_tokens.{role}" for role in GPT_TOKENS if getattr(config.task_tokens, role) is not None]
    default = TaskConfig.model_fields["lm_weight"].default       # GPT-1's 0.5, which a BERT leaves at 0
    given += [f"tasks[{task.name}].lm_weight={task.lm_weight:g}" for task in config.tasks
              if task.lm_weight not in (0, default)]
    if given:
        raise StageError(f"finetune: {', '.join(given)} set, but the pretrained model is a BERT: GPT-1's task tokens "
                         "and auxiliary LM loss apply to a GPT only (BERT reads [CLS]/[SEP] and fine-tunes without an "
                         "LM loss); remove them")


def task_specials(spec: ModelSpec, tokenizer: TokenizerFile, config: FinetuneConfig) -> tuple[Specials, int]:
    """BERT's [CLS]/[SEP]/[PAD]; GPT-1's start/delim/extract: named special tokens, else unused embedding rows."""
    if spec.arch == "bert":
        ids = spec.special_tokens
        return Specials(ids["[CLS]"], ids["[SEP]"], ids["[SEP]"], ids["[PAD]"]), 0
    chosen, new = {}, 0
    for role in GPT_TOKENS:
        name = getattr(config.task_tokens, role)
        if name is None:
            chosen[role], new = spec.vocab_size + new, new + 1
        elif name not in tokenizer.special_tokens:
            raise StageError(f"finetune.task_tokens.{role}={name!r} is not a special token of the tokenizer "
                             f"(it has {', '.join(tokenizer.special_tokens)})")
        else:
            chosen[role] = tokenizer.special_tokens[name]
    free = spec.padded_vocab_size - spec.vocab_size
    extra = 0 if new <= free else -(-(new - free) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    pad = spec.special_tokens.get("<|endoftext|>", chosen["extract"])
    return Specials(chosen["start"], chosen["delim"], chosen["extract"], pad), extra


# ---- one task -------------------------------------------------------------------------------


def run_task(task: TaskConfig, config: FinetuneConfig, inputs: Inputs, ctx: StageContext, result: StageResult,
             tracker: TaskRuns) -> dict[str, Any]:
    """Fine-tunes one task (and its sample-efficiency runs); returns its GLUE results, if it is a GLUE task."""
    job = prepare_job(task, config, inputs, ctx, result)
    params = {**task.model_dump(mode="json"), "resolved": job.hyper.__dict__, "init": config.init}
    with tracker.run(task.name, params) as run_id:
        main = fit(job, config.init, 1.0, run_id)
        files = write_task(job, main, result)
        if task.sample_efficiency:
            files += sample_efficiency(job, main, result)
        tracker.log(run_id, {k.split("/", 1)[1] if len(main.metrics) == 1 else k: v
                             for k, v in task_stats(main).items()}, files)
    note(f"{task.name}: " + ", ".join(f"{s}/{k}={v:.4f}" for s, m in main.metrics.items() for k, v in
                                      list(m.items())[:2]), "finetune")
    return glue_results(job, main)


def prepare_job(task: TaskConfig, config: FinetuneConfig, inputs: Inputs, ctx: StageContext,
                result: StageResult) -> Job:
    """Reads the task's files and encodes them for the model's family; bad rows go to `result`."""
    bad = BadRowCounter()
    data = load_task(task, ctx.seed, bad)
    hyper = runs.resolve(task, inputs.spec)
    preparer = Preparer(data, make_layout(inputs.spec.arch, inputs.specials, hyper.max_length), inputs.encoding,
                        QaSettings(task.max_query_length, hyper.doc_stride))
    train = preparer.prepare(data.train, True, bad, str(task.train or data.name))
    evals = {name: preparer.prepare(examples, False, bad, name) for name, examples in data.evals.items()}
    record_bad_rows(task.name, bad, result)
    head = head_spec(task, data, inputs, hyper, config.init)
    return Job(task, config, inputs, ctx, data, hyper, head, train, evals)


def glue_results(job: Job, main: RunResult) -> dict[str, Any]:
    """A GLUE task's scores and sizes keyed by the table's columns (mnli-m, mnli-mm for an eval mapping)."""
    if not job.data.kind.startswith("glue/"):
        return {}
    column = {name: job.data.kind.split("/")[1] + name[len(job.task.name):] for name in job.evals}
    sizes = {column[n]: f"{len(job.train.examples)} / {len(p.examples)}" for n, p in job.evals.items()}
    return {"results": {column[n]: m for n, m in main.metrics.items()}, "sizes": sizes}


def head_spec(task: TaskConfig, data: TaskData, inputs: Inputs, hyper: runs.Hyper, init: str) -> HeadSpec:
    kind = head_kind(data.form, data.regression)
    outputs = 2 if kind == "span" else 1 if kind == "regress" else len(data.labels)
    ids = inputs.specials
    tokens = ({"start": ids.start, "delim": ids.delim, "extract": ids.extract} if inputs.spec.arch == "gpt"
              else {"[CLS]": ids.start, "[SEP]": ids.delim, "[PAD]": ids.pad})
    return HeadSpec(task=task.name, kind=kind, family=inputs.spec.arch, n_outputs=outputs, labels=data.labels,
                    form=data.form, max_length=hyper.max_length, lm_weight=hyper.lm_weight,
                    task_tokens=tokens if inputs.spec.arch == "gpt" else {}, pad_id=ids.pad, init=init)


def record_bad_rows(task: str, bad: BadRowCounter, result: StageResult) -> None:
    for row in bad.rows:
        result.bad(row.path, row.reason, row.detail, where=str(row.line) if row.line is not None else None)
        result.count(f"{task}/bad/{row.reason}")


# ---- training and predicting ------------------------------------------------------------------


def fit(job: Job, init: str, fraction: float, run_id: str | None,
        evals: dict[str, Prepared] | None = None) -> RunResult:
    """Trains one run (init x training fraction) and scores every evaluation set (or `evals`)."""
    task, ctx, evals = job.task, job.ctx, evals or job.evals
    chosen = subset_examples(job.train, task, ctx.seed, fraction)
    features = features_of(job.train, chosen)
    run_dir = ctx.scratch / task.name / f"{init}-{round(fraction * 100)}"
    train_path, eval_path = runs.write_features(run_dir, features, next(iter(evals.values())).features)
    plan = runs.schedule(task, job.config, len(features))
    loop = runs.loop_config(task, job.config, job.hyper, plan, run_dir, ctx.seed, (ctx.mlflow_tracking_uri, run_id))
    worker = runs.WorkerSpec(loop=loop, base=job.inputs.spec, head=job.head.model_copy(update={"init": init}),
                             dropout=task.dropout, extra_rows=job.inputs.extra_rows,
                             pretrained_dir=str(job.inputs.model_dir) if init == "pretrained" else None,
                             train_features=train_path, eval_features=eval_path,
                             group_by_length=task.group_by_length)
    model_dir = runs.train(worker, job.config)
    model, device = runs.load_model(model_dir, job.config)
    info = {"steps": plan.max_steps, "train_examples": len(chosen), "train_features": len(features)}
    if task.select_best_epoch:
        info["selected_epoch"] = select_epoch(job, model, run_dir, device)
    scored = {name: predict_and_score(job, model, prep, device) for name, prep in evals.items()}
    return RunResult({n: s[1] for n, s in scored.items()}, {n: s[0] for n, s in scored.items()}, model_dir, info)


def subset_examples(train: Prepared, task: TaskConfig, seed: int, fraction: float) -> list[int]:
    """Indices of the training examples in the run: all, or a nested seeded share of them."""
    if fraction >= 1.0:
        return list(range(len(train.examples)))
    position = {id(e): i for i, e in enumerate(train.examples)}
    ordered = subset_order(train.examples, f"finetune-subset:{task.name}:{seed}")
    return sorted(position[id(e)] for e in take_fraction(ordered, fraction))


def features_of(prepared: Prepared, examples: list[int]) -> Features:
    """The features of the chosen examples (all of an example's windows or chunks)."""
    if prepared.meta is None:
        return prepared.features.subset(examples)
    wanted = set(examples)
    return prepared.features.subset([i for i, meta in enumerate(prepared.meta) if meta.example in wanted])


def predict_and_score(job: Job, model: Any, prepared: Prepared, device: Any) -> tuple[Predictions, dict[str, float]]:
    task, data = job.task, job.data
    logits = feature_logits(model, prepared, job.config.eval_batch_size, device, job.config.precision)
    predictions = decode(data, prepared, logits, task.n_best, task.max_answer_length, task.null_threshold)
    metrics = score(data, prepared.examples, predictions, task.null_threshold)
    if data.kind == "fomc":
        index = fomc_index(prepared, predictions)["overall"]     # undefined (left out) without dovish or hawkish
        metrics.update({name: index[key] for name, key in (("sentiment_index", "index"),
                        ("sentiment_index_gold", "gold_index")) if index[key] is not None})
    return predictions, metrics


def select_epoch(job: Job, model: Any, run_dir: Path, device: Any) -> int:
    """Loads the epoch whose first evaluation set's official metric is highest (dev-set selection)."""
    import safetensors.torch

    from tasks.models import MODEL_FILE

    first, official = next(iter(job.evals.values())), job.data.metrics[0]
    best_score, best_state, best_epoch = None, None, 0
    for epoch, checkpoint in enumerate(runs.epoch_checkpoints(run_dir), start=1):
        state = safetensors.torch.load_file(checkpoint / MODEL_FILE, device=str(device))
        model.load_state_dict(state, strict=True)
        value = predict_and_score(job, model, first, device)[1][official]
        if best_score is None or value > best_score:
            best_score, best_state, best_epoch = value, state, epoch
    model.load_state_dict(best_state, strict=True)
    return best_epoch


def fomc_index(prepared: Prepared, predictions: Predictions) -> dict[str, Any]:
    examples = prepared.examples
    return sentiment_index([e.id for e in examples], predictions.values, [e.label for e in examples],
                           [e.group for e in examples])


# ---- writing the outputs ----------------------------------------------------------------------


def write_task(job: Job, main: RunResult, result: StageResult) -> list[Path]:
    """Every evaluation set's files, the fine-tuned model and task.json; the stats; the files written."""
    task, data, train = job.task, job.data, job.train
    files = []
    for name, prepared in job.evals.items():
        files += write_eval_set(job.ctx.output / name, data, prepared, main.predictions[name], main.metrics[name])
    folder = job.ctx.output / task.name
    copy_model(main.model_dir, folder / "model")
    learning = main.model_dir.parent / METRICS_FILE
    if learning.is_file():
        shutil.copy2(learning, folder / "learning_curve.jsonl")
        files.append(folder / "learning_curve.jsonl")
    (folder / "task.json").write_text(json.dumps(task_summary(job, main), indent=2, sort_keys=True, default=str) + "\n")
    files.append(folder / "task.json")
    result.stats.update(task_stats(main))
    result.stats.update({f"{task.name}/train_examples": len(train.examples), f"{task.name}/steps": main.info["steps"],
                         **{f"{task.name}/train_{key}": value for key, value in train.counts.items()}})
    if "selected_epoch" in main.info:
        result.stats[f"{task.name}/selected_epoch"] = main.info["selected_epoch"]
    result.artifacts.setdefault("tasks", {})[task.name] = {"model": f"{task.name}/model", "head": job.head.kind,
                                                           "eval_sets": list(job.evals)}
    return files


def task_summary(job: Job, main: RunResult) -> dict[str, Any]:
    """task.json: what was trained on what, with which hyperparameters, and everything the recipe cut or carved."""
    counts = {**job.train.counts, **{f"{n}/{k}": v for n, p in job.evals.items() for k, v in p.counts.items()}}
    summary = {"kind": job.data.kind, "form": job.data.form, "labels": job.data.labels,
               "hyperparameters": job.hyper.__dict__, "train_examples": len(job.train.examples),
               "eval_examples": {n: len(p.examples) for n, p in job.evals.items()}, "counts": counts,
               "notes": job.data.notes, **main.info}
    if "selected_epoch" in main.info:
        selection = (f"dev-set selection: epoch {main.info['selected_epoch']} scored best on "
                     f"{next(iter(job.evals))} and is the one reported")
        summary["notes"] = [*job.data.notes, selection]
    return summary


def task_stats(main: RunResult) -> dict[str, float]:
    return {name: value for eval_name, metrics in main.metrics.items()
            for name, value in TaskMetrics(metrics).stats(eval_name).items()}


def write_eval_set(folder: Path, data: TaskData, prepared: Prepared, predictions: Predictions,
                   metrics: dict[str, float]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    TaskMetrics(metrics).write(folder / "metrics.json")
    write_predictions(folder / "predictions.jsonl", prediction_rows(data, prepared.examples, predictions))
    files = [folder / "metrics.json", folder / "predictions.jsonl"]
    if data.form == "qa":
        files += write_squad_files(folder, data, prepared, predictions)
    if data.kind == "fomc":
        index = fomc_index(prepared, predictions)
        (folder / "sentiment_index.json").write_text(json.dumps(index, indent=2) + "\n")
        files.append(folder / "sentiment_index.json")
    return files


def write_squad_files(folder: Path, data: TaskData, prepared: Prepared, predictions: Predictions) -> list[Path]:
    """The official evaluation script's inputs: predictions.json and (v2) null_odds.json; n-best lists too."""
    ids = [e.id for e in prepared.examples]
    files = {"predictions.json": dict(zip(ids, predictions.values)),
             "nbest_predictions.json": dict(zip(ids, predictions.nbest))}
    if data.allow_null:
        files["null_odds.json"] = dict(zip(ids, predictions.null_odds))
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return [folder / name for name in files]


def copy_model(model_dir: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.is_file():
            link_or_copy(path, target / path.name)


# ---- sample efficiency --------------------------------------------------------------------------


def sample_efficiency(job: Job, main: RunResult, result: StageResult) -> list[Path]:
    """The official metric at each training fraction for each init: a table, a PNG, stats."""
    task, curve, metric = job.task, job.task.sample_efficiency, job.data.metrics[0]
    first = next(iter(job.evals))
    points: dict[str, dict[float, float]] = {init: {} for init in curve.inits}
    sizes: dict[float, int] = {}
    for init in curve.inits:
        for fraction in curve.fractions:
            reuse = init == job.config.init and fraction == 1.0
            point = main if reuse else fit(job, init, fraction, None, {first: job.evals[first]})
            points[init][fraction], sizes[fraction] = point.metrics[first][metric], point.info["train_examples"]
            result.stats[f"{task.name}/curve/{init}/{round(fraction * 100)}/{metric}"] = points[init][fraction]
    folder = job.ctx.output / task.name
    table = curve_table(task.name, metric, points, sizes)
    (folder / "curve.md").write_text(table)
    (folder / "curve.json").write_text(json.dumps({"metric": metric, "sizes": sizes, "points": points}, indent=2))
    png = curve_png(folder / "sample_efficiency.png", task.name, metric, points, sizes)
    publish_markdown(table, key=f"finetune-{task.name}-curve".replace("_", "-").replace(".", "-"),
                     description=f"{task.name}: sample efficiency")
    return [folder / "curve.md", folder / "curve.json", png]


# ---- the GLUE table -----------------------------------------------------------------------------


def write_glue_table(glue: dict[str, Any], spec: ModelSpec, init: str, output: Path, tracker: TaskRuns) -> None:
    title = f"lmforge {spec.arch} {spec.n_layer}L-{spec.d_model} ({init})"
    table = glue_table(glue["results"], glue["sizes"], title)
    (output / "glue_table.md").write_text(table)
    tracker.log_stage_text(table, "glue_table.md")
    publish_markdown(table, key="finetune-glue", description="GLUE results, in the layout of the BERT paper's table")
