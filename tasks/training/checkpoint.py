"""Checkpoints: `step-N/` holding the model (`tasks.models.files`) and the trainer state, written atomically.

A checkpoint is written into `step-N.tmp/`, its files fsynced, `checkpoint.json` (the file list with
sizes) written last, and the directory renamed to `step-N/`; `tasks.models.files.is_complete` is
what counts as finished. `trainer_state.pt` holds the optimizer state (keyed by parameter name), the
step, counters, and one entry per rank: its RNG states and its loader position. It is read with
`weights_only=True`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from storage.formats import ModelSpec
from tasks.models.files import INDEX_FILE, MODEL_FILE, is_complete, step_number, write_model
from tasks.training.runtime import DistEnv

STATE_FILE = "trainer_state.pt"


def write_checkpoint(root: Path, step: int, model_state: dict[str, torch.Tensor], spec: ModelSpec,
                     trainer_state: dict[str, Any]) -> Path:
    """Writes `root/step-{step}` atomically and returns it."""
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_model(tmp, model_state, spec)
    torch.save(trainer_state, tmp / STATE_FILE)
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    (tmp / INDEX_FILE).write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")
    for path in tmp.iterdir():
        _fsync(path)
    _fsync(tmp)
    if final.exists():                  # an incomplete leftover of the same step
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_complete(p)), key=step_number)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep_last: int) -> None:
    """Keeps the newest `keep_last` complete checkpoints; removes older ones and leftover `.tmp` dirs."""
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)
    for leftover in root.glob("step-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def _options(env: DistEnv, **extra: bool) -> StateDictOptions:
    # Full (unsharded) tensors gathered to CPU: the same files whether DDP or FSDP wrote them.
    return StateDictOptions(full_state_dict=env.distributed, cpu_offload=env.distributed, **extra)


def save(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, spec: ModelSpec,
         shared: dict[str, Any], rank_state: dict[str, Any], env: DistEnv) -> Path | None:
    """Collective: every rank calls it; rank 0 writes `root/step-{step}`. Returns its path on rank 0."""
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(env))
    ranks = [None] * env.world
    if env.distributed:
        dist.all_gather_object(ranks, rank_state)
    else:
        ranks = [rank_state]
    path = None
    if env.is_main:
        state = {**shared, "step": step, "world_size": env.world, "optimizer": optim_state, "ranks": ranks}
        path = write_checkpoint(root, step, model_state, spec, state)
    if env.distributed:
        dist.barrier()
    return path


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict[str, Any]:
    """Restores weights and optimizer on every rank; returns the trainer state (this rank's at 'rank')."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    if state["world_size"] != env.world:
        raise RuntimeError(f"{path} was written by {state['world_size']} ranks; this run has {env.world}")
    model_state = safetensors.torch.load_file(path / MODEL_FILE)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=state.pop("optimizer"),
                   options=StateDictOptions(full_state_dict=env.distributed, strict=True))
    state["rank"] = state.pop("ranks")[env.rank]
    return state
