"""The shared loop trains an objective it knows nothing about: a fine-tuning-style classifier.

The objective below is what a finetune stage writes: it loads a pretrained encoder
(`load_pretrained`), puts a head on `hidden_states`, makes its own batches and its own loss. The
loop gives it accumulation, checkpoints, exact resume and validation without being told more.
"""
from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from storage.formats import ModelSpec
from tasks.models import build_model, load_pretrained
from tasks.models.files import write_model
from tasks.training.config import LoopConfig, OptimConfig
from tasks.training.loop import DONE_FILE, Trainer
from tasks.training.objective import Batch, Loss, Objective
from tasks.training.runtime import DistEnv

ENV = DistEnv(rank=0, local_rank=0, world=1, device=torch.device("cpu"))
SPEC = ModelSpec(arch="gpt", n_layer=2, n_head=2, d_model=64, d_mlp=256, seq_len=16, vocab_size=262,
                 padded_vocab_size=384, special_tokens={"<|endoftext|>": 256})


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.spec.d_model, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.hidden_states(input_ids)[:, 0])     # position 0 sees the first token


class FirstTokenIsSmall(Objective):
    """Sequences of 16 token ids, labelled 1 when the first is below 8: learnable in a few steps."""

    def __init__(self, model_dir: Path, seed: int) -> None:
        self.model_dir, self.seed, self.spec = model_dir, seed, SPEC

    def build_model(self) -> nn.Module:
        encoder, _ = load_pretrained(self.model_dir)
        return Classifier(encoder.train())

    def _batch(self, index: int, size: int) -> Batch:
        ids = torch.randint(0, 16, (size, SPEC.seq_len), generator=torch.Generator().manual_seed(self.seed + index))
        return Batch({"input_ids": ids, "labels": (ids[:, 0] < 8).long()}, {"index": index}, ids.numel())

    def train_batches(self, rank: int, world: int, micro_batch: int,
                      position: dict[str, int] | None) -> Iterator[Batch]:
        start = position["index"] + 1 if position else rank
        return (self._batch(index, micro_batch) for index in itertools.count(start, world))

    def val_batches(self, rank: int, world: int, micro_batch: int) -> Iterator[Batch]:
        return (self._batch(-1 - index, micro_batch) for index in itertools.count(rank, world))

    def loss(self, model: nn.Module, inputs: dict[str, torch.Tensor | None]) -> Loss:
        loss = F.cross_entropy(model(inputs["input_ids"]), inputs["labels"])
        return Loss(loss, loss)

    def dummy_inputs(self, size: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.zeros(size, SPEC.seq_len, dtype=torch.long, device=device),
                "labels": torch.zeros(size, dtype=torch.long, device=device)}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    write_model(directory, build_model(SPEC).state_dict(), SPEC)
    return directory


def fit(run_dir: Path, pretrained: Path) -> Trainer:
    config = LoopConfig(name="finetune", run_dir=str(run_dir), seed=3, max_steps=12, sequences_per_rank=16,
                        micro_batch=8, precision="fp32", checkpoint_every=4, keep_last=3, log_every=1,
                        eval_every=6, eval_batches=2, optim=OptimConfig(lr=3e-3, warmup_steps=2), progress=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, FirstTokenIsSmall(pretrained, seed=3), ENV)
    trainer.fit()
    return trainer


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_custom_objective_trains_and_resumes_exactly(tmp_path: Path, pretrained: Path) -> None:
    whole = fit(tmp_path / "whole", pretrained)
    logged = metrics(tmp_path / "whole")
    assert whole.accum == 2 and [m["step"] for m in logged] == list(range(1, 13))
    assert logged[-1]["val_loss"] < logged[5]["val_loss"] < 0.69                # it learns the rule
    assert "val_ppl" not in logged[-1]                                         # no LM metrics forced on it
    weights = safetensors.torch.load_file(tmp_path / "whole" / "model" / "model.safetensors")
    assert {"head.weight", "encoder.wte.weight"} <= weights.keys()

    # A crash after step 4: later checkpoints and the finished outputs never got written.
    crashed = shutil.copytree(tmp_path / "whole", tmp_path / "crashed")
    for leftover in ("checkpoints/step-8", "checkpoints/step-12", "model", DONE_FILE):
        shutil.rmtree(crashed / leftover) if (crashed / leftover).is_dir() else (crashed / leftover).unlink()
    resumed = fit(crashed, pretrained)
    assert resumed.resumed_from == 4
    assert [m["loss"] for m in metrics(crashed)] == [m["loss"] for m in logged]
    again = safetensors.torch.load_file(crashed / "model" / "model.safetensors")
    assert all(torch.equal(weights[name], again[name]) for name in weights)
