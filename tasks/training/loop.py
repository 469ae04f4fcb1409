"""The training loop, the same for every task family: `Trainer(config, objective, env).fit()`.

Every rank builds the same model from the same seed, wraps it (DDP, or FSDP2's `fully_shard`),
streams its own batches, and runs the plain loop: gradient accumulation over micro-batches, clipping,
AdamW, a checkpoint every N steps, validation every M. Rank 0 writes metrics, checkpoints and the
final model under `run_dir`. The task family (model, data, inputs, loss) is the `Objective`'s; the
loop never asks which architecture it trains.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from storage import progress
from tasks.models import count_params, flops_per_token
from tasks.models.files import CONFIG_FILE, MODEL_FILE
from tasks.training import checkpoint
from tasks.training.batches import Batch, Prefetcher
from tasks.training.config import LoopConfig
from tasks.training.objective import Objective
from tasks.training.optim import build_optimizer, lr_at
from tasks.training.reporting import MetricsLog, note
from tasks.training.runtime import DistEnv, autocast, device_name, peak_flops, resolve_precision

CPU_AUTO_MICRO_BATCH = 16          # micro_batch=None on CPU: the largest divisor of the batch up to this
DONE_FILE, CHECKPOINTS_DIR, MODEL_DIR = "done.json", "checkpoints", "model"
INPUT_SEED_STRIDE = 7919           # rank r's input generator starts at seed + stride * (r + 1)
EVAL_INPUT_SEED = 1234             # random input transforms (MLM masks) are the same at every evaluation


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf and `on_nonfinite` is 'stop'."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    seconds: float
    data_wait: float
    tokens: int                    # summed over ranks
    consumed: int = 0              # training-set units the loaders passed over, summed over ranks
    skipped: bool = False


class Throughput:
    """Tokens, step seconds and data-wait seconds summed over a stretch of steps."""

    def __init__(self) -> None:
        self.tokens, self.seconds, self.wait, self.steps = 0, 0.0, 0.0, 0

    def add(self, result: StepResult) -> None:
        self.tokens += result.tokens
        self.seconds += result.seconds
        self.wait += result.data_wait
        self.steps += 1

    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def wait_share(self) -> float:
        return self.wait / self.seconds if self.seconds else 0.0


class Trainer:
    def __init__(self, config: LoopConfig, objective: Objective, env: DistEnv) -> None:
        self.cfg, self.objective, self.env, self.spec = config, objective, env, objective.spec
        self.run_dir = Path(config.run_dir)
        self.precision = resolve_precision(config.precision, env.device)
        torch.manual_seed(config.seed)                     # identical initial weights on every rank
        self.model = objective.build_model().to(env.device)
        self.params, self.flops_per_token = count_params(self.model, self.spec), flops_per_token(self.model, self.spec)
        self.micro_batch = self._micro_batch()
        self.accum = config.sequences_per_rank // self.micro_batch
        self.wrapped = self._wrap()
        self.optimizer = build_optimizer(self.model, config.optim, env.device)
        torch.manual_seed(config.seed + 1 + env.rank)      # dropout differs across ranks
        self.input_rng = torch.Generator().manual_seed(config.seed + INPUT_SEED_STRIDE * (env.rank + 1))
        self.log = MetricsLog(self.run_dir, config.mlflow_tracking_uri, config.mlflow_run_id, config.name) \
            if env.is_main else None
        self.peak = self._peak()                           # all ranks together; None: unknown GPU
        self.summary: dict[str, float] = {"tokens_trained": 0, "train_wall_s": 0.0, "skipped_nonfinite_steps": 0}
        self.position: dict[str, int] | None = None        # the training loader's, after the last batch taken
        self.resumed_from = 0

    # ---- setup -------------------------------------------------------------------------------

    def _micro_batch(self) -> int:
        """The configured micro-batch, else the largest divisor of the per-rank batch that fits."""
        if self.cfg.micro_batch:
            return self.cfg.micro_batch
        per_rank = self.cfg.sequences_per_rank
        divisors = [d for d in range(per_rank, 0, -1) if per_rank % d == 0]
        if self.env.device.type != "cuda":
            return next(d for d in divisors if d <= CPU_AUTO_MICRO_BATCH)
        chosen = torch.tensor(self._probe(divisors), device=self.env.device)
        if self.env.distributed:
            dist.all_reduce(chosen, op=dist.ReduceOp.MIN)     # every rank must use the same size
        return int(chosen)

    def _probe(self, sizes: list[int]) -> int:
        """The first size whose forward and backward fit in GPU memory (tried before any wrapping)."""
        for size in sizes:
            fits = self._fits(size)
            torch.cuda.empty_cache()                # the failed attempt's tensors are gone by now
            if fits:
                return size
            note(f"micro-batch {size} does not fit in GPU memory; trying a smaller one", self.cfg.name)
        raise RuntimeError("not even a micro-batch of 1 sequence fits in GPU memory")

    def _fits(self, size: int) -> bool:
        try:
            with autocast(self.env.device, self.precision):
                loss = self.objective.loss(self.model, self.objective.dummy_inputs(size, self.env.device)).value
            loss.backward()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            self.model.zero_grad(set_to_none=True)

    def _wrap(self) -> nn.Module:
        """DDP or FSDP2 across ranks (nothing for one process), then torch.compile if asked."""
        wrapped: nn.Module = self.model
        if self.sharded:
            self._fully_shard()
        elif self.env.distributed:
            ids = [self.env.local_rank] if self.env.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, gradient_as_bucket_view=True)
        self.ddp = wrapped if wrapped is not self.model else None
        return torch.compile(wrapped) if self.cfg.compile else wrapped

    @property
    def sharded(self) -> bool:
        return self.env.distributed and self.cfg.dist == "fsdp"

    def _fully_shard(self) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.precision == "bf16" else MixedPrecisionPolicy()
        for unit in self.objective.shard_units(self.model):
            fully_shard(unit, mp_policy=policy)
        fully_shard(self.model, mp_policy=policy)

    def _peak(self) -> float | None:
        """Peak FLOP/s of all ranks for MFU; None (with one warning) for a GPU nobody told us about."""
        peak = peak_flops(self.env.device, self.precision, self.cfg.peak_flops)
        if peak is None and self.env.is_main:
            note(f"unknown accelerator {device_name(self.env.device)!r}: MFU is not reported; set "
                 f"{self.cfg.name}.peak_flops to one device's dense {self.precision} peak FLOP/s", self.cfg.name)
        return peak * self.env.world if peak else None

    def _mfu(self, tokens_per_s: float) -> dict[str, float]:
        return {"mfu": tokens_per_s * self.flops_per_token / self.peak} if self.peak else {}

    # ---- the loop ----------------------------------------------------------------------------

    def fit(self) -> None:
        start = self._restore()
        batches, bar = self.train_batches(), self._progress(start)
        self.interval, self.rate = Throughput(), Throughput()     # since the last log line; this attempt
        loop_start, wall_before = time.perf_counter(), self.summary["train_wall_s"]
        try:
            for step in range(start + 1, self.cfg.max_steps + 1):
                result = self.train_step(step, batches)
                self.interval.add(result)
                if step > start + 1 or step == self.cfg.max_steps:    # the attempt's first step warms up
                    self.rate.add(result)
                self.summary["train_wall_s"] = wall_before + time.perf_counter() - loop_start
                self._after_step(step, result)
                if bar is not None:
                    bar.set_postfix(loss=f"{result.loss:.3f}", refresh=False)
                    bar.update(1)
        finally:
            batches.close()
            if bar is not None:
                bar.close()
        self._finish()

    def train_step(self, step: int, batches: Prefetcher) -> StepResult:
        lr = lr_at(step, self.cfg.optim, self.cfg.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start, wait, tokens, consumed = time.perf_counter(), 0.0, 0, 0
        loss_sum = torch.zeros((), device=self.env.device)
        for micro in range(self.accum):
            waited = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - waited
            inputs = self._inputs(batch, self.input_rng)
            with self._gradient_sync(micro == self.accum - 1):
                with autocast(self.env.device, self.precision):
                    loss = self.objective.loss(self.wrapped, inputs)
                (loss.value / self.accum).backward()
            loss_sum += loss.logged.detach().float()
            self.position, tokens, consumed = batch.position, tokens + batch.tokens, consumed + batch.consumed
        grad_norm = self._clip()
        loss, grad_norm, tokens, consumed = self._reduce(loss_sum / self.accum, grad_norm, tokens, consumed)
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self._nonfinite(step, loss, grad_norm)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, lr, time.perf_counter() - start, wait, tokens, consumed, skipped)

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are averaged across ranks only on the last micro-batch of a step."""
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _clip(self) -> torch.Tensor:
        max_norm = self.cfg.optim.grad_clip or float("inf")
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _reduce(self, loss: torch.Tensor, grad_norm: torch.Tensor, tokens: int,
                consumed: int) -> tuple[float, float, int, int]:
        """Mean loss over ranks, the (already global) grad norm, total tokens and units consumed: one collective."""
        counts = torch.tensor([float(tokens), float(consumed)], device=loss.device, dtype=torch.float64)
        values = torch.cat([torch.stack([loss.double(), grad_norm.double()]), counts])
        if self.env.distributed:
            dist.all_reduce(values)
            values[:2] /= self.env.world
        loss_value, norm_value, token_count, consumed_count = values.tolist()
        return loss_value, norm_value, int(token_count), int(consumed_count)

    def _nonfinite(self, step: int, loss: float, grad_norm: float) -> None:
        if self.cfg.on_nonfinite == "stop":
            raise NonFiniteLossError(f"non-finite training loss {loss} (grad norm {grad_norm}) at step {step}; "
                                     "lower optim.lr, or set on_nonfinite='skip' to skip such batches")
        self.summary["skipped_nonfinite_steps"] += 1
        note(f"step {step}: non-finite loss {loss}; batch skipped", self.cfg.name)

    def _after_step(self, step: int, result: StepResult) -> None:
        self.summary["tokens_trained"] += result.tokens
        self.summary["final_train_loss"] = result.loss
        self._count_epochs(result.consumed)
        last = step == self.cfg.max_steps
        metrics = self._evaluate() if self.cfg.eval_every and (step % self.cfg.eval_every == 0 or last) else {}
        self.summary.update({f"final_{k}": v for k, v in metrics.items()})
        if step % self.cfg.log_every == 0 or last or metrics:
            self._log(step, result, metrics)
            self.interval = Throughput()
            rate = self.rate.tokens_per_s()
            self.summary.update(tokens_per_s=rate, data_wait_share=self.rate.wait_share(), **self._mfu(rate))
        if self.env.is_main:
            progress.report(self.run_dir, step, self.cfg.max_steps, "step", force=last)
        if last or (self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0):
            self._checkpoint(step)

    def _count_epochs(self, consumed: int) -> None:
        """`data_consumed` and `epochs` (= data_consumed / the objective's epoch_size), when it has one."""
        if not self.objective.epoch_size:
            return
        # .get: a checkpoint written before epochs were counted resumes from 0
        self.summary["data_consumed"] = self.summary.get("data_consumed", 0) + consumed
        self.summary["epochs"] = self.summary["data_consumed"] / self.objective.epoch_size

    def _log(self, step: int, result: StepResult, metrics: dict[str, float]) -> None:
        if self.log is None:
            return
        interval, tokens_per_s = self.interval, self.interval.tokens_per_s()
        self.log.log(step, {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                            "tokens_per_s": tokens_per_s, **self._mfu(tokens_per_s),
                            "step_time_s": interval.seconds / max(1, interval.steps),
                            "data_wait_share": interval.wait_share(), "tokens": self.summary["tokens_trained"],
                            "skipped": result.skipped, **self._epochs(), **metrics})

    def _epochs(self) -> dict[str, float]:
        return {"epochs": self.summary["epochs"]} if "epochs" in self.summary else {}

    # ---- data --------------------------------------------------------------------------------

    def train_batches(self) -> Prefetcher:
        """This rank's training micro-batches, read ahead in a background thread."""
        batches = self.objective.train_batches(self.env.rank, self.env.world, self.micro_batch, self.position)
        return Prefetcher(batches, transform=self._to_tensors)

    def _to_tensors(self, batch: Batch) -> Batch:
        pin = self.env.device.type == "cuda"
        arrays = {k: None if v is None else torch.as_tensor(v) for k, v in batch.arrays.items()}
        batch.arrays = {k: v.pin_memory() if pin and v is not None else v for k, v in arrays.items()}
        return batch

    def _inputs(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor | None]:
        """The objective's inputs for `batch`, on the device."""
        inputs = self.objective.inputs(batch, generator)
        return {k: None if v is None else v.to(self.env.device, non_blocking=True) for k, v in inputs.items()}

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Mean loss over `eval_batches` micro-batches per rank of the validation data (the same ones each time)."""
        self.model.eval()
        batches = self.objective.val_batches(self.env.rank, self.env.world, self.micro_batch)
        generator = torch.Generator().manual_seed(EVAL_INPUT_SEED)
        total = torch.zeros((), device=self.env.device, dtype=torch.float64)
        for _ in range(self.cfg.eval_batches):
            inputs = self._inputs(self._to_tensors(next(batches)), generator)
            with autocast(self.env.device, self.precision):
                total += self.objective.loss(self.model, inputs).logged.double()
        if self.env.distributed:
            dist.all_reduce(total)
        self.model.train()
        return self.objective.val_metrics(total.item() / (self.cfg.eval_batches * self.env.world))

    # ---- checkpoints and the end -------------------------------------------------------------

    def _rank_state(self) -> dict[str, Any]:
        empty = torch.empty(0, dtype=torch.uint8)
        cuda = torch.cuda.get_rng_state(self.env.device) if self.env.device.type == "cuda" else empty
        return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda, "input_rng": self.input_rng.get_state(),
                "loader": self.position}

    def _checkpoint(self, step: int) -> None:
        root = self.run_dir / CHECKPOINTS_DIR
        checkpoint.save(root, step, self.model, self.optimizer, self.spec, {"summary": self.summary},
                        self._rank_state(), self.env)
        if self.env.is_main:
            checkpoint.prune(root, self.cfg.keep_last)

    def _restore(self) -> int:
        """Loads the newest complete checkpoint, if any; returns the step it was taken after."""
        found = checkpoint.latest_checkpoint(self.run_dir / CHECKPOINTS_DIR)
        if found is None:
            return 0
        state = checkpoint.load(found, self.model, self.optimizer, self.env)
        mine = state["rank"]
        torch.set_rng_state(mine["torch_rng"])
        if self.env.device.type == "cuda" and mine["cuda_rng"].numel():
            torch.cuda.set_rng_state(mine["cuda_rng"], self.env.device)
        input_rng = mine.get("input_rng", mine.get("mask_rng"))    # "mask_rng": checkpoints before the shared loop
        if input_rng.numel():
            self.input_rng.set_state(input_rng)
        self.position, self.summary = dict(mine["loader"]), dict(state["summary"])
        self.resumed_from = state["step"]
        if self.log is not None:
            self.log.truncate_after(state["step"])
            note(f"resumed from {found}", self.cfg.name)
        return state["step"]

    def _progress(self, start: int) -> Any:
        if not (self.env.is_main and self.cfg.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.max_steps, initial=start, desc=self.cfg.name, unit="step", dynamic_ncols=True)

    def _finish(self) -> None:
        """The objective's extras, the final model, MLflow artifacts and `done.json` (rank 0)."""
        final = checkpoint.latest_checkpoint(self.run_dir / CHECKPOINTS_DIR)
        extras = self._finish_objective()
        if self.env.is_main:
            model_dir = export_model(final, self.run_dir / MODEL_DIR)
            self.log.log_artifacts(model_dir, extras)
            done = {**self.summary, "steps": self.cfg.max_steps, "params": self.params,
                    "resumed_from_step": self.resumed_from, "micro_batch": self.micro_batch,
                    "grad_accum": self.accum, "world_size": self.env.world, "final_checkpoint": final.name}
            (self.run_dir / DONE_FILE).write_text(json.dumps(done, indent=2, sort_keys=True) + "\n")
        if self.env.distributed:
            dist.barrier()

    def _finish_objective(self) -> list[Path]:
        """`Objective.finish` on rank 0, or on every rank when the model is sharded (FSDP needs them all)."""
        if not (self.env.is_main or self.sharded):
            return []
        with autocast(self.env.device, self.precision):
            return self.objective.finish(self.model, self.env.device, self.run_dir if self.env.is_main else None)


def export_model(final: Path, model_dir: Path) -> Path:
    """`model/` = the final checkpoint's weights and config (hard links where the filesystem allows)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, CONFIG_FILE):
        target = model_dir / name
        target.unlink(missing_ok=True)
        link_or_copy(final / name, target)
    return model_dir


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
