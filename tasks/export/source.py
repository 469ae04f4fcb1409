"""Where a trained model and its tokenizer are: a stage output (or model folder) and the tokenizer it was trained with.

A pretrain output inside a workspace records in its `_SUCCESS.json` which tokenizer output it was
built from (`input_stages`, `input_fingerprints`); a later stage that reads the pretrain output (a
finetune) is followed back through its own inputs. Outside a workspace, name the tokenizer folder.

A fine-tuned task model (`<finetune output>/<task>/model/`, with `head.json`) is used through its
encoder: for a GPT that is a whole language model (its embedding is the tied output layer).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from storage.formats import ModelSpec
from storage.stage import StageError
from storage.workspace import SUCCESS_FILE
from tasks.models import build_model
from tasks.models.files import CONFIG_FILE, MODEL_FILE
from tasks.models.pretrained import check_tokenizer, load_pretrained, model_directory, read_weights

SEARCH_DEPTH = 3          # a model folder sits at most this deep under its stage output (checkpoints/step-N)
HEAD_FILE = "head.json"   # beside a fine-tuned task model's weights (tasks.finetune.checkpoint)


@dataclass(frozen=True)
class ModelSource:
    model_dir: Path            # model.safetensors + config.json
    tokenizer_dir: Path        # the tokenizer stage's files
    spec: ModelSpec

    @property
    def finetuned(self) -> bool:
        return (self.model_dir / HEAD_FILE).is_file()

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's weights on the CPU; a fine-tuned task model's encoder alone (its head left out)."""
        if not self.finetuned:
            return read_weights(self.model_dir / MODEL_FILE, "cpu")
        from tasks.finetune.checkpoint import encoder_weights

        return encoder_weights(self.model_dir)[1]

    def load_gpt(self, device: torch.device) -> nn.Module:
        """The GPT in eval mode on `device` (a fine-tuned one: its encoder, a whole GPT)."""
        if self.spec.arch != "gpt":
            raise StageError(f"{self.model_dir}: a {self.spec.arch.upper()} (masked LM) does not generate text "
                             "left to right; generate needs a GPT")
        if not self.finetuned:
            return load_pretrained(self.model_dir, device, self.tokenizer_dir)[0]
        with torch.device("meta"):
            model = build_model(self.spec)
        model.load_state_dict(self.weights(), strict=True, assign=True)
        return model.to(device).eval()


def resolve_source(path: Path | str, tokenizer: Path | str | None = None) -> ModelSource:
    """The model under `path` and its tokenizer (given, or found through the workspace); checked to match."""
    path = Path(path)
    tasks = sorted(p.parent.name for p in path.glob("*/model") if p.is_dir()) if path.is_dir() else []
    if tasks and not (path / MODEL_FILE).exists() and not (path / "model").exists():
        raise StageError(f"{path}: holds one model per task ({', '.join(tasks)}); name one, e.g. {path / tasks[0]}")
    model_dir = model_directory(path)
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else find_tokenizer(path)
    spec = ModelSpec.read(model_dir / CONFIG_FILE)
    check_tokenizer(spec, model_dir / CONFIG_FILE, tokenizer_dir)
    return ModelSource(model_dir, tokenizer_dir, spec)


def find_tokenizer(path: Path) -> Path:
    """The tokenizer output the stage output holding `path` was (transitively) built from."""
    stage_dir = _stage_output(path)
    if stage_dir is None:
        raise StageError(f"{path}: not inside a committed stage output (no {SUCCESS_FILE} above it), so its "
                         "tokenizer is unknown: pass --tokenizer DIR (the tokenizer stage's output)")
    found = _tokenizer_of(stage_dir, seen=set())
    if found is None:
        raise StageError(f"{stage_dir / SUCCESS_FILE}: no tokenizer among its inputs; pass --tokenizer DIR")
    return found


def _stage_output(path: Path) -> Path | None:
    for candidate in [path, *path.resolve().parents][: SEARCH_DEPTH + 1]:
        if (candidate / SUCCESS_FILE).is_file():
            return candidate
    return None


def _tokenizer_of(stage_dir: Path, seen: set[Path]) -> Path | None:
    """Depth-first through the recorded inputs: stages/<stage>/<fingerprint>/ sit side by side."""
    if stage_dir in seen or not (stage_dir / SUCCESS_FILE).is_file():
        return None
    seen.add(stage_dir)
    success = json.loads((stage_dir / SUCCESS_FILE).read_text())
    stages_root = stage_dir.parent.parent
    inputs = {key: stages_root / stage / success.get("input_fingerprints", {}).get(key, "")
              for key, stage in success.get("input_stages", {}).items()}
    if "tokenizer" in inputs and inputs["tokenizer"].is_dir():
        return inputs["tokenizer"]
    for upstream in inputs.values():
        found = _tokenizer_of(upstream, seen)
        if found is not None:
            return found
    return None
