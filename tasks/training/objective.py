"""What one task family brings to the shared training loop: its model, its data, its inputs and its loss.

The loop (`tasks.training.loop.Trainer`) never looks at the architecture; it calls, in order:

    build_model()                         once, after seeding torch (identical weights on every rank)
    shard_units(model)                    with FSDP2: the submodules sharded one by one
    dummy_inputs(size, device)            when probing the largest micro-batch that fits in memory
    train_batches(rank, world, mb, pos)   in a background thread; `Batch.position` is checkpointed
    inputs(batch, generator)              per micro-batch, in the training thread (e.g. MLM masking)
    loss(model, inputs)                   under autocast; `value` is backpropagated, `logged` reported
    val_batches(...) / val_metrics(loss)  at each evaluation
    finish(model, device, out_dir)        after the last step (e.g. writing generated samples)

Pretraining registers one per architecture (`tasks.pretrain.objectives`). A fine-tuning stage writes
its own: `build_model` loads the pretrained encoder (`tasks.models.load_pretrained`) and adds a head,
the batches come from its dataset, the loss is its task's; then it runs the same loop
(`tasks.training.launch.run_worker`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from storage.formats import ModelSpec
from tasks.training.batches import Batch

__all__ = ["Batch", "Loss", "Objective"]


class Loss(NamedTuple):
    value: torch.Tensor               # what backward() sees (auxiliary losses included)
    logged: torch.Tensor              # the task's own loss: logged, averaged over micro-batches, validated


class Objective(ABC):
    """A task family's part of training; the loop owns everything else. See the module docstring."""

    spec: ModelSpec                   # the model's shape; `config.json` beside every checkpoint's weights
    # Units (those `Batch.consumed` counts) in one pass over the training set; the loop then reports
    # `epochs` = units consumed by all ranks / epoch_size. None: epochs are not reported.
    epoch_size: int | None = None

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model to train, on the CPU (the loop moves it); torch is already seeded."""

    @abstractmethod
    def train_batches(self, rank: int, world: int, micro_batch: int,
                      position: dict[str, int] | None) -> Iterator[Batch]:
        """This rank's endless training micro-batches, continuing after `position` (None: from the start)."""

    @abstractmethod
    def val_batches(self, rank: int, world: int, micro_batch: int) -> Iterator[Batch]:
        """This rank's validation micro-batches: the same ones at every evaluation."""

    @abstractmethod
    def loss(self, model: nn.Module, inputs: dict[str, torch.Tensor | None]) -> Loss:
        """Runs `model` (possibly DDP/FSDP-wrapped or compiled) on `inputs`."""

    @abstractmethod
    def dummy_inputs(self, size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Inputs of `size` full-length examples on `device`, for the micro-batch memory probe."""

    def inputs(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor | None]:
        """The model's inputs (CPU tensors). `generator` is for random transforms; the loop checkpoints it."""
        return dict(batch.arrays)

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """Submodules FSDP2 shards one by one (its blocks) before sharding the whole model."""
        return []

    def val_metrics(self, loss: float) -> dict[str, float]:
        """What an evaluation reports, from the mean validation loss."""
        return {"val_loss": loss}

    def finish(self, model: nn.Module, device: torch.device, out_dir: Path | None) -> list[Path]:
        """After the last step: extra outputs written into `out_dir` (rank 0; None on other ranks).

        Called on every rank when the model is sharded (a forward pass needs them all), else on rank 0.
        Returns the files written, which are logged to MLflow with the model.
        """
        return []
