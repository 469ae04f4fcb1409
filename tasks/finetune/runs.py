"""One fine-tuning run: a task's features, a seed and an init through the shared loop, then its predictions.

A run lives in `scratch/<task>/<init>-<percent>/` (features, `worker.json`, checkpoints, the final
model), so an interrupted stage resumes each run from its last checkpoint and skips finished ones.
One process trains in the stage's own process (no torchrun start-up per task); more run under
torchrun with DDP. Both run `tasks.training.launch.run_worker`, so the results are the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from storage.formats import ModelSpec
from storage.stage import StageError
from tasks.finetune.checkpoint import HEAD_FILE, load_finetuned
from tasks.finetune.config import FinetuneConfig, TaskConfig
from tasks.finetune.features import Features
from tasks.finetune.model import HeadSpec, TaskModel
from tasks.finetune.objective import FinetuneObjective, WorkerSpec
from tasks.training.config import LoopConfig, OptimConfig
from tasks.training.launch import launch, run_worker, torchrun_args, worker_command
from tasks.training.loop import CHECKPOINTS_DIR, DONE_FILE, MODEL_DIR
from tasks.training.runtime import choose_device

SPEC_FILE, TRAIN_FEATURES, EVAL_FEATURES = "worker.json", "train.npz", "eval.npz"
WORKER_MODULE = "tasks.finetune.worker"
CPU_MICRO_BATCH = 16
VAL_BATCHES = 4                      # micro-batches of the eval set behind each validation loss


@dataclass(frozen=True)
class Hyper:
    """A task's hyperparameters with the family's defaults filled in."""

    lr: float
    warmup_ratio: float
    lm_weight: float
    max_length: int
    doc_stride: int


def resolve(task: TaskConfig, spec: ModelSpec) -> Hyper:
    """BERT: lr 3e-5, warmup 10%, no LM loss; GPT-1: lr 6.25e-5, warmup 0.2%, lm_weight as given."""
    bert = spec.arch == "bert"
    max_length = task.max_length or spec.seq_len
    if max_length > spec.seq_len:
        raise StageError(f"task {task.name!r}: max_length {max_length} exceeds the model's seq_len {spec.seq_len}")
    if task.kind == "squad" and task.max_query_length + 3 >= max_length:
        raise StageError(f"task {task.name!r}: max_query_length {task.max_query_length} leaves no room for the "
                         f"context in {max_length} tokens; lower it")
    return Hyper(lr=task.lr or (3e-5 if bert else 6.25e-5),
                 warmup_ratio=task.warmup_ratio if task.warmup_ratio is not None else (0.1 if bert else 0.002),
                 lm_weight=0.0 if bert else task.lm_weight, max_length=max_length,
                 doc_stride=task.doc_stride or max(1, max_length // 2))


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int
    max_steps: int
    per_rank: int
    micro_batch: int | None


def schedule(task: TaskConfig, config: FinetuneConfig, n_train: int) -> Schedule:
    """Optimizer steps from epochs and batch size; the batch split over ranks and micro-batches."""
    world = config.nproc_per_node
    per_rank, remainder = divmod(task.batch_size, world)
    if remainder or not per_rank:
        raise StageError(f"task {task.name!r}: batch_size {task.batch_size} must be a multiple of "
                         f"nproc_per_node {world}")
    if task.micro_batch and per_rank % task.micro_batch:
        raise StageError(f"task {task.name!r}: micro_batch {task.micro_batch} does not divide the {per_rank} "
                         "examples each process takes per step")
    steps_per_epoch = math.ceil(n_train / task.batch_size)
    return Schedule(steps_per_epoch, max(1, round(task.epochs * steps_per_epoch)), per_rank, task.micro_batch)


def loop_config(task: TaskConfig, config: FinetuneConfig, hyper: Hyper, plan: Schedule, run_dir: Path, seed: int,
                tracking: tuple[str | None, str | None]) -> LoopConfig:
    optim = OptimConfig(lr=hyper.lr, min_lr_ratio=0.0, weight_decay=task.weight_decay, betas=(0.9, 0.999),
                        warmup_steps=round(hyper.warmup_ratio * plan.max_steps), decay="linear", grad_clip=1.0)
    best = task.select_best_epoch
    return LoopConfig(name=f"finetune:{task.name}", run_dir=str(run_dir), seed=seed, max_steps=plan.max_steps,
                      sequences_per_rank=plan.per_rank, micro_batch=plan.micro_batch, optim=optim,
                      precision=config.precision, device=config.device, dist="ddp",
                      checkpoint_every=plan.steps_per_epoch if best else 0,
                      keep_last=max(1, int(task.epochs)) if best else 1, log_every=config.log_every,
                      eval_every=plan.steps_per_epoch, eval_batches=VAL_BATCHES, peak_flops=config.peak_flops,
                      progress=config.progress, mlflow_tracking_uri=tracking[0], mlflow_run_id=tracking[1])


def train(spec: WorkerSpec, config: FinetuneConfig) -> Path:
    """Trains unless the run directory already holds a finished run; returns the model directory."""
    run_dir = Path(spec.loop.run_dir)
    if not (run_dir / DONE_FILE).exists():
        spec_path = run_dir / SPEC_FILE
        spec_path.write_text(spec.model_dump_json(indent=2) + "\n")
        if _in_process(config):
            run_worker(spec.loop, lambda: FinetuneObjective(spec))
        else:
            torchrun = torchrun_args(1, config.nproc_per_node, None, run_id="lmforge-finetune")
            launch(worker_command(WORKER_MODULE, spec_path, torchrun), run_dir)
    model_dir = run_dir / MODEL_DIR
    spec.head.write(model_dir / HEAD_FILE)
    return model_dir


def _in_process(config: FinetuneConfig) -> bool:
    return config.launcher == "inprocess" or (config.launcher == "auto" and config.nproc_per_node == 1)


def write_features(run_dir: Path, train: Features, evaluation: Features | None) -> tuple[str, str | None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    train_path = str(train.save(run_dir / TRAIN_FEATURES))
    eval_path = str(evaluation.save(run_dir / EVAL_FEATURES)) if evaluation is not None else None
    return train_path, eval_path


def epoch_checkpoints(run_dir: Path) -> list[Path]:
    """The kept per-epoch checkpoints of a `select_best_epoch` run, oldest first."""
    from tasks.training.checkpoint import complete_checkpoints

    return complete_checkpoints(run_dir / CHECKPOINTS_DIR)


def load_model(model_dir: Path, config: FinetuneConfig) -> tuple[TaskModel, torch.device]:
    device = choose_device(config.device, 0)
    model, _ = load_finetuned(model_dir, device)
    return model, device


def head_of(model_dir: Path) -> HeadSpec:
    return HeadSpec.read(model_dir / HEAD_FILE)
