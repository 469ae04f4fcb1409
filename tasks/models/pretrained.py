"""Loading a trained model for fine-tuning, evaluation or export: weights and config, nothing else.

`load_pretrained` accepts a model directory (`model.safetensors` + `config.json`: a pretrain output's
`model/`, or a complete `checkpoints/step-N/`) or a pretrain output itself (its `model/`). It refuses
anything half-written, naming the path and what is wrong, and, given the tokenizer, refuses one whose
vocabulary or special-token ids differ from those the model was trained with.
"""
from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from storage.formats import FileFormatError, ModelSpec, TokenizerFile
from storage.stage import StageError
from storage.workspace import SUCCESS_FILE
from tasks.models.files import CONFIG_FILE, INDEX_FILE, MODEL_FILE, STEP_DIR, checkpoint_problem
from tasks.models.registry import build_model
from tasks.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE

MODEL_DIR = "model"          # inside a pretrain output


class PretrainedModelError(StageError):
    """A model directory that is incomplete or does not match its tokenizer; the message names the paths."""


def load_pretrained(model_dir: Path | str, device: torch.device | str = "cpu",
                    tokenizer_dir: Path | str | None = None) -> tuple[nn.Module, ModelSpec]:
    """(model in eval mode on `device`, its spec) from a model directory or a pretrain output."""
    directory = model_directory(Path(model_dir))
    spec = ModelSpec.read(directory / CONFIG_FILE)
    if tokenizer_dir is not None:
        check_tokenizer(spec, directory / CONFIG_FILE, Path(tokenizer_dir))
    with torch.device("meta"):                   # no time spent initialising weights about to be replaced
        model = build_model(spec)
    model.load_state_dict(read_weights(directory / MODEL_FILE, device), strict=True, assign=True)
    return model.to(device).eval(), spec


def model_directory(path: Path) -> Path:
    """The directory holding the weights: `path` itself, or its `model/`; refused unless complete."""
    if not path.is_dir():
        raise PretrainedModelError(f"{path}: not a directory (expected a model directory or a pretrain output)")
    if ".tmp" in path.name:
        raise PretrainedModelError(f"{path}: an unfinished write (*.tmp*); load a finished model or checkpoint")
    is_model = any((path / name).exists() for name in (MODEL_FILE, CONFIG_FILE, INDEX_FILE)) or \
        STEP_DIR.match(path.name)
    if not is_model and not (path / MODEL_DIR).is_dir():
        raise PretrainedModelError(f"{path}: holds neither {MODEL_FILE} + {CONFIG_FILE} nor a {MODEL_DIR}/ folder")
    directory = path if is_model else path / MODEL_DIR
    problem = model_problem(directory)
    if problem:
        raise PretrainedModelError(f"{directory}: not a complete model: {problem}")
    return directory


def model_problem(directory: Path) -> str | None:
    """Why `directory` is not a loadable model, or None."""
    if STEP_DIR.match(directory.name) or (directory / INDEX_FILE).exists():
        problem = checkpoint_problem(directory)
        if problem:
            return problem
    missing = [name for name in (MODEL_FILE, CONFIG_FILE) if not (directory / name).is_file()]
    if missing:
        return f"{' and '.join(missing)} missing"
    return committed_size_problem(directory) or safetensors_problem(directory / MODEL_FILE)


def committed_size_problem(directory: Path) -> str | None:
    """In a committed stage output, the files must have the sizes its `_SUCCESS.json` lists."""
    success = directory.parent / SUCCESS_FILE
    if not success.is_file():
        return None
    listed = {entry["path"]: entry["bytes"] for entry in json.loads(success.read_text()).get("files", [])}
    for name in (MODEL_FILE, CONFIG_FILE):
        key, size = f"{directory.name}/{name}", (directory / name).stat().st_size
        if listed.get(key) != size:
            return f"{name} has {size} bytes; {success} lists {listed.get(key, 'no such file')}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """A truncated or padded weights file: its size must be what its header describes."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length > size - 8:
            return f"{MODEL_FILE} is truncated ({size} bytes, no complete header)"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return f"{MODEL_FILE} has an unreadable header"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if size != 8 + length + end:
        return f"{MODEL_FILE} has {size} bytes; its header describes {8 + length + end}"
    return None


def read_weights(path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path, device=str(device))
    except Exception as exc:      # safetensors raises its own error types for a corrupt file
        raise PretrainedModelError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


def check_tokenizer(spec: ModelSpec, config_path: Path, tokenizer_dir: Path) -> None:
    """The tokenizer must give the model's vocabulary size and its special-token ids."""
    tokenizer_path = tokenizer_dir / TOKENIZER_CONFIG_FILE
    try:
        tokenizer = TokenizerFile.read(tokenizer_path)
    except FileFormatError as exc:
        raise PretrainedModelError(f"tokenizer: {exc}") from None
    if tokenizer.vocab_size != spec.vocab_size:
        raise PretrainedModelError(f"vocabulary mismatch: the tokenizer {tokenizer_path} has vocab_size "
                                   f"{tokenizer.vocab_size}, the model {config_path} has {spec.vocab_size}")
    differ = {name: (tokenizer.special_tokens.get(name), model_id) for name, model_id in spec.special_tokens.items()
              if tokenizer.special_tokens.get(name) != model_id}
    if differ:
        sides = "; ".join(f"{name}: tokenizer {tok}, model {mine}" for name, (tok, mine) in differ.items())
        raise PretrainedModelError(f"special tokens differ ({sides}) between the tokenizer {tokenizer_path} "
                                   f"and the model {config_path}")
