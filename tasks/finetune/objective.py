"""Fine-tuning on the shared loop: the task model, its seeded epochs of features, its loss.

The training order is a fixed sequence of examples: epoch e is a permutation drawn from (seed, e),
and the epochs follow each other. Optimizer step s takes positions [s * B, (s + 1) * B) of it; rank r
reads its own `B / world` of them, in micro-batches. So the examples of a step do not depend on the
world size, and a loader position is one number (the micro-batch count) for exact resume.

With `group_by_length` (HF Trainer's option of that name), each run of 50 batches of the permutation
is sorted by length and cut into batches, whose order is then shuffled: a batch holds examples of
similar length, so little of it is padding (a third of the compute on SST-2 without it).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from storage.configbase import StrictModel
from storage.formats import ModelSpec
from tasks.finetune.checkpoint import build_task_model
from tasks.finetune.features import Features
from tasks.finetune.model import HeadSpec, spec_for_finetuning
from tasks.training.config import LoopConfig
from tasks.training.objective import Batch, Loss, Objective

MEGABATCH = 50                 # batches sorted by length together (HF's group_by_length)


class WorkerSpec(StrictModel):
    """What a fine-tuning worker is handed (JSON in the run directory)."""

    loop: LoopConfig
    base: ModelSpec                   # the pretrained shape
    head: HeadSpec
    dropout: float
    extra_rows: int                   # embedding rows added for new task tokens
    pretrained_dir: str | None        # None: random init
    train_features: str
    eval_features: str | None = None
    group_by_length: bool = True


class FinetuneObjective(Objective):
    def __init__(self, spec: WorkerSpec) -> None:
        self.worker = spec
        self.spec = spec_for_finetuning(spec.base, spec.dropout, spec.extra_rows)
        self.train = Features.load(Path(spec.train_features))
        self.eval = Features.load(Path(spec.eval_features)) if spec.eval_features else None
        self.seed, self.per_rank, self.pad = spec.loop.seed, spec.loop.sequences_per_rank, spec.head.pad_id
        self.longest = self.train.lengths.reshape(len(self.train), self.train.n_seq).max(axis=1)
        self._epoch, self._permutation = -1, np.arange(0)

    def build_model(self) -> nn.Module:
        pretrained = Path(self.worker.pretrained_dir) if self.worker.pretrained_dir else None
        return build_task_model(self.worker.base, self.worker.head, pretrained, self.worker.dropout,
                                self.worker.extra_rows)

    def order(self, position: int, batch: int) -> int:
        """The example at `position` of the endless training order (`batch`: examples per optimizer step)."""
        epoch, index = divmod(position, len(self.train))
        if epoch != self._epoch:
            self._epoch, self._permutation = epoch, self.epoch_order(epoch, batch)
        return int(self._permutation[index])

    def epoch_order(self, epoch: int, batch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.train))
        if not self.worker.group_by_length:
            return order
        mega = MEGABATCH * batch
        runs = [sorted(order[i:i + mega], key=lambda j: -self.longest[j]) for i in range(0, len(order), mega)]
        batches = [run[i:i + batch] for run in runs for i in range(0, len(run), batch)]
        full, rest = [b for b in batches if len(b) == batch], [b for b in batches if len(b) < batch]
        shuffled = [full[i] for i in rng.permutation(len(full))]
        return np.array([j for b in shuffled + rest for j in b], dtype=np.int64)

    def train_batches(self, rank: int, world: int, micro_batch: int,
                      position: dict[str, int] | None) -> Iterator[Batch]:
        accum = self.per_rank // micro_batch
        for count in itertools.count(position["micro"] + 1 if position else 0):
            step, micro = divmod(count, accum)
            first = step * self.per_rank * world + rank * self.per_rank + micro * micro_batch
            indices = [self.order(first + i, self.per_rank * world) for i in range(micro_batch)]
            yield Batch(self.train.batch(indices, self.pad), {"micro": count}, self.train.real_tokens(indices))

    def val_batches(self, rank: int, world: int, micro_batch: int) -> Iterator[Batch]:
        features = self.eval or self.train
        starts = range(0, len(features), micro_batch)
        for number, start in enumerate(itertools.cycle(starts)):
            if number % world == rank:
                indices = list(range(start, min(start + micro_batch, len(features))))
                yield Batch(features.batch(indices, self.pad), {}, features.real_tokens(indices))

    def loss(self, model: nn.Module, inputs: dict[str, torch.Tensor | None]) -> Loss:
        out = model(**inputs)
        return Loss(out.loss, out.task_loss)

    def dummy_inputs(self, size: int, device: torch.device) -> dict[str, torch.Tensor]:
        shape = (size, self.train.n_seq, self.worker.head.max_length)
        inputs = {"input_ids": torch.zeros(shape, dtype=torch.long, device=device),
                  "attention_mask": torch.ones(shape, dtype=torch.long, device=device)}
        if self.train.segments is not None:
            inputs["segment_ids"] = torch.zeros(shape, dtype=torch.long, device=device)
        inputs["labels"] = self._dummy_labels(size, device)
        return inputs

    def _dummy_labels(self, size: int, device: torch.device) -> torch.Tensor:
        kind = self.train.label_kind
        if kind == "score":
            return torch.zeros(size, device=device)
        if kind == "span":
            return torch.zeros(size, 2, dtype=torch.long, device=device)
        if kind == "tags":
            return torch.zeros(size, self.worker.head.max_length, dtype=torch.long, device=device)
        return torch.zeros(size, dtype=torch.long, device=device)

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        encoder = model.encoder
        return list(encoder.blocks if hasattr(encoder, "blocks") else encoder.layers)
