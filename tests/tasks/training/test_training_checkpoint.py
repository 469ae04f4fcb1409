"""Checkpoints are atomic, restore weights and optimizer exactly, and load nothing but tensors."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from storage.formats import ModelSpec
from tasks.models import build_model
from tasks.training import checkpoint
from tasks.training.config import OptimConfig
from tasks.training.optim import build_optimizer
from tasks.training.runtime import DistEnv

ENV = DistEnv(rank=0, local_rank=0, world=1, device=torch.device("cpu"))


def trained_nano(steps: int = 2):
    torch.manual_seed(0)
    spec = ModelSpec(arch="gpt", n_layer=2, n_head=2, d_model=64, d_mlp=256, seq_len=64, vocab_size=262,
                     padded_vocab_size=384, special_tokens={"<|endoftext|>": 256})
    model = build_model(spec)
    optimizer = build_optimizer(model, OptimConfig(), ENV.device)
    for _ in range(steps):
        idx = torch.randint(0, 256, (2, 64))
        model(idx, torch.roll(idx, -1, 1)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return spec, model, optimizer


def save(root: Path, step: int, model, optimizer, spec) -> Path:
    rank_state = {"torch_rng": torch.get_rng_state(), "loader": {"epoch": 0, "unit": 3, "offset": step}}
    return checkpoint.save(root, step, model, optimizer, spec, {"summary": {"tokens_trained": step}}, rank_state, ENV)


def test_round_trip_restores_weights_optimizer_and_rank_state(tmp_path: Path) -> None:
    spec, model, optimizer = trained_nano()
    path = save(tmp_path, 20, model, optimizer, spec)
    assert sorted(p.name for p in path.iterdir()) == ["checkpoint.json", "config.json", "model.safetensors",
                                                      "trainer_state.pt"]
    fresh = build_model(spec)
    fresh_optimizer = build_optimizer(fresh, OptimConfig(), ENV.device)
    state = checkpoint.load(path, fresh, fresh_optimizer, ENV)
    assert state["step"] == 20 and state["rank"]["loader"] == {"epoch": 0, "unit": 3, "offset": 20}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    before, after = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(before[i]["exp_avg_sq"], after[i]["exp_avg_sq"]) for i in before)
    assert all(float(before[i]["step"]) == float(after[i]["step"]) == 2.0 for i in before)


def test_partial_checkpoints_are_never_loaded_and_pruning_keeps_the_newest(tmp_path: Path) -> None:
    spec, model, optimizer = trained_nano(1)
    for step in (10, 20):
        save(tmp_path, step, model, optimizer, spec)
    shutil.copytree(tmp_path / "step-20", tmp_path / "step-30.tmp")            # written, never renamed
    shutil.copytree(tmp_path / "step-20", tmp_path / "step-40")                # a half-copied directory
    with (tmp_path / "step-40" / "model.safetensors").open("r+b") as handle:
        handle.truncate(1000)
    (tmp_path / "step-50").mkdir()                                             # crashed before any index
    (tmp_path / "step-50" / "model.safetensors").write_bytes(b"\0" * 10)
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-20"
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-10", "step-20"]
    checkpoint.prune(tmp_path, keep_last=1)
    assert not (tmp_path / "step-10").exists() and not (tmp_path / "step-30.tmp").exists()
    assert (tmp_path / "step-20").exists()
    save(tmp_path, 40, model, optimizer, spec)                                 # replaces the half-written one
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-40"


def test_trainer_state_is_read_with_weights_only(tmp_path: Path) -> None:
    spec, model, optimizer = trained_nano(1)
    path = save(tmp_path, 1, model, optimizer, spec)
    state = torch.load(path / checkpoint.STATE_FILE, weights_only=True)
    state["ranks"][0]["loader"] = shutil.rmtree                             # an object that is not data
    torch.save(state, path / checkpoint.STATE_FILE)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        checkpoint.load(path, model, optimizer, ENV)
