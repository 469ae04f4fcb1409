"""The torchrun entry point: `torchrun ... -m tasks.pretrain.train --config trainer.json`.

Every worker builds the same model from the same seed, wraps it (DDP, or FSDP2's `fully_shard`),
streams its own row groups, and runs the plain loop: gradient accumulation over micro-batches,
clipping, AdamW, a checkpoint every N steps. Rank 0 writes metrics, checkpoints and the final
model under `run_dir`; a worker that fails writes its traceback to `run_dir/errors/` first.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tasks.pretrain import checkpoint
from tasks.pretrain.config import TrainerSpec
from tasks.pretrain.data import (Batch, LoaderState, PairIds, PairStream, Prefetcher, TokenStream, bert_batches,
                                 gpt_batches, read_manifest, shard_paths, split_row_groups, strided)
from tasks.pretrain.objectives import Masker, build_model, build_optimizer, count_params, flops_per_token, lr_at
from tasks.pretrain.reporting import SAMPLES_FILE, MetricsLog, load_tokenizer, note, write_samples
from tasks.pretrain.runtime import (DistEnv, autocast, die_with_parent, init_distributed, peak_flops,
                                    resolve_precision, shutdown)

CPU_AUTO_MICRO_BATCH = 16          # micro_batch=None on CPU: the largest divisor of the batch up to this
DONE_FILE, ERRORS_DIR, CHECKPOINTS_DIR, MODEL_DIR = "done.json", "errors", "checkpoints", "model"
EVAL_MASK_SEED = 1234              # validation masks are the same at every evaluation


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
    def __init__(self, spec: TrainerSpec, env: DistEnv) -> None:
        self.spec, self.env, self.cfg, self.mspec = spec, env, spec.config, spec.model
        self.run_dir = Path(spec.run_dir)
        self.precision = resolve_precision(self.cfg.precision, env.device)
        torch.manual_seed(spec.seed)                       # identical initial weights on every rank
        self.model = build_model(self.mspec).to(env.device)
        self.params, self.flops_per_token = count_params(self.model, self.mspec), flops_per_token(self.model, self.mspec)
        self.micro_batch = self._micro_batch()
        self.accum = spec.sequences_per_rank // self.micro_batch
        self.wrapped = self._wrap()
        self.optimizer = build_optimizer(self.model, self.cfg.optim, env.device)
        torch.manual_seed(spec.seed + 1 + env.rank)        # dropout differs across ranks
        bert = self.mspec.arch == "bert"
        self.masker = Masker(self.mspec, self.cfg.mlm_probability, spec.seed + 7919 * (env.rank + 1)) if bert else None
        manifest = read_manifest(Path(spec.shard_dir))
        paths = shard_paths(Path(spec.shard_dir), manifest)
        self.groups = {split: split_row_groups(paths, split) for split in ("train", "val")}
        self.log = MetricsLog(self.run_dir, spec.mlflow_tracking_uri, spec.mlflow_run_id) if env.is_main else None
        self.peak = peak_flops(env.device, self.precision, self.cfg.peak_flops) * env.world   # all ranks together
        self.summary: dict[str, float] = {"tokens_trained": 0, "train_wall_s": 0.0, "skipped_nonfinite_steps": 0}
        self.loader_state: dict[str, int] = LoaderState().as_dict()
        self.resumed_from = 0

    # ---- setup -------------------------------------------------------------------------------

    def _micro_batch(self) -> int:
        """The configured micro-batch, else the largest divisor of the per-rank batch that fits."""
        if self.cfg.micro_batch:
            return self.cfg.micro_batch
        per_rank = self.spec.sequences_per_rank
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
            note(f"micro-batch {size} does not fit in GPU memory; trying a smaller one")
        raise RuntimeError("not even a micro-batch of 1 sequence fits in GPU memory")

    def _fits(self, size: int) -> bool:
        try:
            with autocast(self.env.device, self.precision):
                loss = self.model(**self._dummy_inputs(size)).loss
            loss.backward()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            self.model.zero_grad(set_to_none=True)

    def _dummy_inputs(self, size: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(self.mspec.vocab_size, (size, self.mspec.seq_len), device=self.env.device)
        if self.mspec.arch == "gpt":
            return {"idx": ids, "targets": ids}
        zeros = torch.zeros_like(ids)
        return {"input_ids": ids, "segment_ids": zeros, "mlm_labels": ids, "nsp_labels": zeros[:, 0]}

    def _wrap(self) -> nn.Module:
        """DDP or FSDP2 across ranks (nothing for one process), then torch.compile if asked."""
        wrapped: nn.Module = self.model
        if self.env.distributed and self.cfg.dist == "fsdp":
            self._fully_shard()
        elif self.env.distributed:
            ids = [self.env.local_rank] if self.env.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, gradient_as_bucket_view=True)
        self.ddp = wrapped if wrapped is not self.model else None
        return torch.compile(wrapped) if self.cfg.compile else wrapped

    def _fully_shard(self) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.precision == "bf16" else MixedPrecisionPolicy()
        layers = self.model.blocks if self.mspec.arch == "gpt" else self.model.bert.layers
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(self.model, mp_policy=policy)

    # ---- the loop ----------------------------------------------------------------------------

    def fit(self) -> None:
        start = self._restore()
        batches, bar = self.train_batches(), self._progress(start)
        self.interval, self.rate = Throughput(), Throughput()     # since the last log line; this attempt
        loop_start, wall_before = time.perf_counter(), self.summary["train_wall_s"]
        try:
            for step in range(start + 1, self.spec.max_steps + 1):
                result = self.train_step(step, batches)
                self.interval.add(result)
                if step > start + 1 or step == self.spec.max_steps:    # the attempt's first step warms up
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
        lr = lr_at(step, self.cfg.optim, self.spec.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start, wait, tokens = time.perf_counter(), 0.0, 0
        loss_sum = torch.zeros((), device=self.env.device)
        for micro in range(self.accum):
            waited = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - waited
            inputs = self._inputs(batch)
            with self._gradient_sync(micro == self.accum - 1):
                with autocast(self.env.device, self.precision):
                    out = self.wrapped(**inputs)
                (out.loss / self.accum).backward()
            loss_sum += out.lm_loss.detach().float()
            self.loader_state, tokens = batch.state, tokens + batch.tokens
        grad_norm = self._clip()
        loss, grad_norm, tokens = self._reduce(loss_sum / self.accum, grad_norm, tokens)
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self._nonfinite(step, loss, grad_norm)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, lr, time.perf_counter() - start, wait, tokens, skipped)

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are averaged across ranks only on the last micro-batch of a step."""
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        if self.env.distributed and self.cfg.dist == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _clip(self) -> torch.Tensor:
        max_norm = self.cfg.optim.grad_clip or float("inf")
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _reduce(self, loss: torch.Tensor, grad_norm: torch.Tensor, tokens: int) -> tuple[float, float, int]:
        """Mean loss over ranks, the (already global) grad norm, total tokens: one collective, one sync."""
        values = torch.stack([loss.double(), grad_norm.double(), torch.tensor(float(tokens), device=loss.device,
                                                                               dtype=torch.float64)])
        if self.env.distributed:
            dist.all_reduce(values)
            values[:2] /= self.env.world
        loss_value, norm_value, token_count = values.tolist()
        return loss_value, norm_value, int(token_count)

    def _nonfinite(self, step: int, loss: float, grad_norm: float) -> None:
        if self.cfg.on_nonfinite == "stop":
            raise NonFiniteLossError(f"non-finite training loss {loss} (grad norm {grad_norm}) at step {step}; "
                                     "lower optim.lr, or set on_nonfinite='skip' to skip such batches")
        self.summary["skipped_nonfinite_steps"] += 1
        note(f"step {step}: non-finite loss {loss}; batch skipped")

    def _after_step(self, step: int, result: StepResult) -> None:
        self.summary["tokens_trained"] += result.tokens
        self.summary["final_train_loss"] = result.loss
        last = step == self.spec.max_steps
        metrics = self._evaluate() if self.cfg.eval_every and (step % self.cfg.eval_every == 0 or last) else {}
        self.summary.update({f"final_{k}": v for k, v in metrics.items()})
        if step % self.cfg.log_every == 0 or last or metrics:
            self._log(step, result, metrics)
            self.interval = Throughput()
            rate = self.rate.tokens_per_s()
            self.summary.update(tokens_per_s=rate, data_wait_share=self.rate.wait_share(),
                                mfu=rate * self.flops_per_token / self.peak)
        if last or (self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0):
            self._checkpoint(step)

    def _log(self, step: int, result: StepResult, metrics: dict[str, float]) -> None:
        if self.log is None:
            return
        interval, tokens_per_s = self.interval, self.interval.tokens_per_s()
        self.log.log(step, {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                            "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * self.flops_per_token / self.peak,
                            "step_time_s": interval.seconds / max(1, interval.steps),
                            "data_wait_share": interval.wait_share(), "tokens": self.summary["tokens_trained"],
                            "skipped": result.skipped, **metrics})

    # ---- data --------------------------------------------------------------------------------

    def _stream(self, split: str, state: LoaderState | None, rank: int, world: int, shuffle: bool):
        common = dict(split=split, rank=rank, world=world, seed=self.spec.seed, vocab_size=self.mspec.vocab_size,
                      shuffle=shuffle, state=state)
        special = self.mspec.special_tokens
        if self.mspec.arch == "gpt":
            return gpt_batches(TokenStream(self.groups[split], eot_id=special["<|endoftext|>"], **common),
                               self.micro_batch, self.mspec.seq_len)
        ids = PairIds(special["[CLS]"], special["[SEP]"], special["[PAD]"])
        stream = PairStream(self.groups[split], ids=ids, seq_len=self.mspec.seq_len, nsp=self.mspec.nsp, **common)
        return bert_batches(stream, self.micro_batch)

    def train_batches(self) -> Prefetcher:
        """This rank's training micro-batches, read ahead in a background thread."""
        state = LoaderState(**self.loader_state)
        return Prefetcher(self._stream("train", state, self.env.rank, self.env.world, shuffle=True),
                          transform=self._to_tensors)

    def _to_tensors(self, batch: Batch) -> Batch:
        pin = self.env.device.type == "cuda"
        arrays = {k: None if v is None else torch.from_numpy(v) for k, v in batch.arrays.items()}
        batch.arrays = {k: v.pin_memory() if pin and v is not None else v for k, v in arrays.items()}
        return batch

    def _inputs(self, batch: Batch, masker: Masker | None = None) -> dict[str, torch.Tensor | None]:
        """The model's keyword arguments on the device; BERT batches are masked here, afresh each time."""
        arrays = dict(batch.arrays)
        masker = masker or self.masker
        if masker is not None:
            arrays["input_ids"], arrays["mlm_labels"] = masker(arrays["input_ids"])
            if not self.mspec.nsp:
                arrays.pop("nsp_labels")
        return {k: None if v is None else v.to(self.env.device, non_blocking=True) for k, v in arrays.items()}

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Mean loss over `eval_batches` micro-batches per rank of the val split (the same ones each time)."""
        self.model.eval()
        stream = strided(self._stream("val", None, 0, 1, shuffle=False), self.env.rank, self.env.world)
        masker = Masker(self.mspec, self.cfg.mlm_probability, EVAL_MASK_SEED) if self.masker else None
        total = torch.zeros((), device=self.env.device, dtype=torch.float64)
        for _ in range(self.cfg.eval_batches):
            with autocast(self.env.device, self.precision):
                total += self.model(**self._inputs(self._to_tensors(next(stream)), masker)).lm_loss.double()
        if self.env.distributed:
            dist.all_reduce(total)
        self.model.train()
        loss = total.item() / (self.cfg.eval_batches * self.env.world)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}

    # ---- checkpoints and the end -------------------------------------------------------------

    def _rank_state(self) -> dict[str, Any]:
        empty = torch.empty(0, dtype=torch.uint8)
        cuda = torch.cuda.get_rng_state(self.env.device) if self.env.device.type == "cuda" else empty
        mask = self.masker.generator.get_state() if self.masker else empty
        return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda, "mask_rng": mask, "loader": self.loader_state}

    def _checkpoint(self, step: int) -> None:
        root = self.run_dir / CHECKPOINTS_DIR
        checkpoint.save(root, step, self.model, self.optimizer, self.mspec.model_dump(), {"summary": self.summary},
                        self._rank_state(), self.env)
        if self.env.is_main:
            checkpoint.prune(root, self.cfg.keep_last)

    def _restore(self) -> int:
        """Loads the newest complete checkpoint, if any; returns the step it was taken after."""
        root = self.run_dir / CHECKPOINTS_DIR
        found = checkpoint.latest_checkpoint(root)
        if found is None:
            return 0
        state = checkpoint.load(found, self.model, self.optimizer, self.env)
        mine = state["rank"]
        torch.set_rng_state(mine["torch_rng"])
        if self.env.device.type == "cuda" and mine["cuda_rng"].numel():
            torch.cuda.set_rng_state(mine["cuda_rng"], self.env.device)
        if self.masker is not None:
            self.masker.generator.set_state(mine["mask_rng"])
        self.loader_state, self.summary = dict(mine["loader"]), dict(state["summary"])
        self.resumed_from = state["step"]
        if self.log is not None:
            self.log.truncate_after(state["step"])
            note(f"resumed from {found}")
        return state["step"]

    def _progress(self, start: int) -> Any:
        if not (self.env.is_main and self.cfg.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.spec.max_steps, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)

    def _finish(self) -> None:
        """The final model, samples, MLflow artifacts and `done.json` (rank 0)."""
        final = checkpoint.latest_checkpoint(self.run_dir / CHECKPOINTS_DIR)
        samples = self._samples()
        if self.env.is_main:
            model_dir = export_model(final, self.run_dir / MODEL_DIR)
            self.log.log_artifacts(model_dir, samples)
            done = {**self.summary, "steps": self.spec.max_steps, "params": self.params,
                    "resumed_from_step": self.resumed_from, "micro_batch": self.micro_batch,
                    "grad_accum": self.accum, "world_size": self.env.world, "final_checkpoint": final.name}
            (self.run_dir / DONE_FILE).write_text(json.dumps(done, indent=2, sort_keys=True) + "\n")
        if self.env.distributed:
            dist.barrier()

    def _samples(self) -> Path | None:
        """GPT continuations into samples.txt when the tokenizer is at hand (every rank runs FSDP's)."""
        if self.mspec.arch != "gpt" or not self.spec.tokenizer_dir or not self.spec.config.sample.prompts:
            return None
        if not (self.env.is_main or self.cfg.dist == "fsdp"):
            return None
        path = self.run_dir / SAMPLES_FILE if self.env.is_main else None
        encoding = load_tokenizer(self.spec.tokenizer_dir)
        with autocast(self.env.device, self.precision):
            write_samples(self.model, encoding, self.cfg.sample, self.env.device, self.spec.seed, path)
        return path


def export_model(final: Path, model_dir: Path) -> Path:
    """`model/` = the final checkpoint's weights and config (hard links where the filesystem allows)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in (checkpoint.MODEL_FILE, checkpoint.CONFIG_FILE):
        target = model_dir / name
        target.unlink(missing_ok=True)
        link_or_copy(final / name, target)
    return model_dir


def link_or_copy(source: Path, target: Path) -> None:
    import shutil

    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def record_failure(run_dir: Path, rank: int, exc: BaseException) -> None:
    """Writes this rank's traceback where the stage looks for it after torchrun exits."""
    errors = run_dir / ERRORS_DIR
    errors.mkdir(parents=True, exist_ok=True)
    entry = {"rank": rank, "time": time.time(), "type": type(exc).__name__, "message": str(exc),
             "traceback": "".join(traceback.format_exception(exc))}
    (errors / f"rank-{rank}.json").write_text(json.dumps(entry, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="lmforge pretrain worker (run under torchrun)")
    parser.add_argument("--config", required=True, type=Path, help="trainer JSON written by the pretrain stage")
    args = parser.parse_args(argv)
    die_with_parent()
    spec = TrainerSpec.model_validate_json(args.config.read_text())
    try:
        env = init_distributed(spec.config.device)
        Trainer(spec, env).fit()
    except BaseException as exc:
        record_failure(Path(spec.run_dir), int(os.environ.get("RANK", 0)), exc)
        raise
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
