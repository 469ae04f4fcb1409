"""Building a task model from the pretrain output (or at random), and the fine-tuned model on disk.

A fine-tuned model directory holds

    model.safetensors   the encoder's weights under `encoder.` (GPT: `encoder.wte.weight`, ...; BERT: the
                        `BertModel`, i.e. pretrain's `bert.*` keys renamed `encoder.*`) and the head's under `head.`
    config.json         the encoder's `ModelSpec` (with the fine-tuning dropout and any task-token rows)
    head.json           the `HeadSpec`: head kind, labels, layout, task-token ids

so `load_finetuned` rebuilds it exactly, and `encoder_weights` gives the encoder alone, under the keys
`GPT(spec)` / `BertModel(spec)` load strictly (a fine-tuned GPT is still a language model: export and
generate can use it; its padded vocabulary may hold the task-token rows, which sampling never draws).
"""
from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from storage.formats import ModelSpec
from tasks.finetune.model import HeadSpec, TaskModel, encoder_of, spec_for_finetuning
from tasks.models import CONFIG_FILE, MODEL_FILE, build_model
from tasks.models.bert import BertModel
from tasks.models.files import write_model
from tasks.models.gpt import GPT
from tasks.models.layers import INIT_STD
from tasks.models.pretrained import model_directory, read_weights

HEAD_FILE = "head.json"
ENCODER_PREFIX = "encoder."
ENCODERS: dict[str, type[nn.Module]] = {"gpt": GPT, "bert": BertModel}
EMBEDDING = "wte.weight"             # GPT's token embedding: task tokens add rows to it


def build_task_model(base: ModelSpec, head: HeadSpec, pretrained: Path | None, dropout: float,
                     extra_rows: int) -> TaskModel:
    """The task model, freshly seeded where it is new: a random init never reads `pretrained`."""
    spec = spec_for_finetuning(base, dropout, extra_rows)
    if pretrained is None:
        model = build_model(spec)                          # the same architecture, initialised from the seed
    else:
        new_ids = sorted(i for i in head.task_tokens.values() if i >= base.vocab_size)
        model = pretrained_model(pretrained, base, spec, extra_rows, new_ids)
    return TaskModel(encoder_of(model), head, dropout)


def pretrained_model(directory: Path, base: ModelSpec, spec: ModelSpec, extra_rows: int,
                     new_ids: list[int]) -> nn.Module:
    """The pretrain output's weights in a model of `spec`: `extra_rows` more embedding rows, and the rows of
    new task tokens (`new_ids`, past the vocabulary) set by `new_rows`."""
    weights = read_weights(model_directory(directory) / MODEL_FILE, "cpu")
    if extra_rows or new_ids:
        table = weights[EMBEDDING]
        table = torch.cat([table, torch.zeros(extra_rows, table.shape[1], dtype=table.dtype)])
        table[new_ids] = new_rows(table[: base.vocab_size], len(new_ids))
        weights[EMBEDDING] = table
    with torch.device("meta"):
        model = build_model(spec)
    model.load_state_dict(weights, strict=True, assign=True)
    return model


def new_rows(trained: torch.Tensor, count: int) -> torch.Tensor:
    """Embedding rows for new tokens: the mean of the trained rows plus N(0, 0.02) noise.

    A row drawn N(0, 0.02) is near zero beside trained rows (norm ~1 after pretraining), so a new
    token would carry almost no content into attention; the mean puts it on their scale (as HF's
    `resize_token_embeddings` does since 4.46), the noise keeps start, delim and extract apart.
    """
    return trained.mean(dim=0, keepdim=True) + torch.randn(count, trained.shape[1]) * INIT_STD


def save_finetuned(directory: Path, model: TaskModel | dict[str, torch.Tensor], spec: ModelSpec,
                   head: HeadSpec) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = model if isinstance(model, dict) else model.state_dict()
    write_model(directory, state, spec)
    head.write(directory / HEAD_FILE)
    return directory


def encoder_weights(directory: Path | str) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """(the encoder's spec, its weights without the `encoder.` prefix) of a fine-tuned model directory."""
    directory = Path(directory)
    spec = ModelSpec.read(directory / CONFIG_FILE)
    state = safetensors.torch.load_file(directory / MODEL_FILE)
    return spec, {key[len(ENCODER_PREFIX):]: value for key, value in state.items() if key.startswith(ENCODER_PREFIX)}


def load_finetuned(directory: Path | str, device: torch.device | str = "cpu") -> tuple[TaskModel, ModelSpec]:
    """(the fine-tuned model in eval mode, its encoder's spec) from a directory `save_finetuned` wrote."""
    directory = Path(directory)
    spec, head = ModelSpec.read(directory / CONFIG_FILE), HeadSpec.read(directory / HEAD_FILE)
    with torch.device("meta"):
        model = TaskModel(ENCODERS[spec.arch](spec), head, spec.dropout)
    state = safetensors.torch.load_file(directory / MODEL_FILE, device=str(device))
    model.load_state_dict(state, strict=True, assign=True)
    model.lm_excluded = torch.tensor(sorted(head.task_tokens.values()), dtype=torch.long, device=device)
    return model.to(device).eval(), spec
