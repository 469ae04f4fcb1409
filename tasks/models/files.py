"""A model on disk: `model.safetensors` + `config.json` (a `ModelSpec`), alone or inside a checkpoint.

A checkpoint `step-N/` adds `trainer_state.pt` and, written last, `checkpoint.json` listing every
file with its size. A directory counts as a checkpoint only if its name is `step-N` and every
listed file is there at its size, so a `step-N.tmp/` or a half-copied `step-N/` is never loaded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import safetensors.torch
import torch

from storage.formats import ModelSpec

MODEL_FILE, CONFIG_FILE, INDEX_FILE = "model.safetensors", "config.json", "checkpoint.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def write_model(directory: Path, model_state: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    """`model.safetensors` plus `config.json`: what a later stage loads to use the model."""
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in model_state.items()}
    safetensors.torch.save_file(tensors, directory / MODEL_FILE, metadata={"format": "pt"})
    spec.write(directory / CONFIG_FILE)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete `step-N` checkpoint, or None if it is one."""
    if not STEP_DIR.match(path.name):
        return f"{path.name!r} is not named step-N (an unfinished step-N.tmp is never loaded)"
    try:
        files = json.loads((path / INDEX_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"{INDEX_FILE} is missing (the checkpoint was never finished)"
    except (OSError, ValueError, KeyError, TypeError):
        files = None
    if not isinstance(files, dict):
        return f"{INDEX_FILE} is not a valid index"
    for name, size in files.items():
        if not (path / name).is_file():
            return f"{name} is listed in {INDEX_FILE} but missing"
        if (path / name).stat().st_size != size:
            return f"{name} has {(path / name).stat().st_size} bytes; {INDEX_FILE} lists {size}"
    return None


def is_complete(path: Path) -> bool:
    """True if `path` is a `step-N` directory whose index lists files that are all there, at their sizes."""
    return checkpoint_problem(path) is None


def step_number(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))
