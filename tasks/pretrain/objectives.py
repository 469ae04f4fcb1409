"""What pretraining optimizes, one objective per architecture: causal LM (GPT) and masked LM (BERT).

Both stream the shard stage's token shards (`tasks.pretrain.data`): each rank its own row groups for
training, one shared stream dealt out round-robin for validation. `OBJECTIVES` maps a model's
`arch` to its objective; it is the one place pretraining chooses by architecture.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kernels
from storage.formats import ModelSpec
from tasks.models import IGNORE, build_model
from tasks.pretrain.config import KernelsConfig, SampleConfig, TrainerSpec
from tasks.pretrain.data import (LoaderState, PairIds, PairStream, TokenStream, bert_batches, gpt_batches,
                                 read_manifest, shard_paths, split_row_groups, strided)
from tasks.tokenizer import load_encoding
from tasks.training.objective import Batch, Loss, Objective
from tasks.training.reporting import note

EOT = "<|endoftext|>"
SAMPLES_FILE = "samples.txt"
KERNELS_FILE = "kernels.json"      # which kernels trained the model: beside its config.json, not in it


class ShardObjective(Objective):
    """Language-model pretraining on token shards; subclasses say how a split becomes micro-batches."""

    def __init__(self, spec: TrainerSpec) -> None:
        self.trainer, self.spec, self.seed = spec, spec.model, spec.loop.seed
        manifest = read_manifest(Path(spec.shard_dir))
        paths = shard_paths(Path(spec.shard_dir), manifest)
        self.epoch_size = manifest.tokens_train     # one epoch: every document token of the training split
        self.groups = {split: split_row_groups(paths, split) for split in ("train", "val")}

    @abstractmethod
    def _batches(self, split: str, state: LoaderState | None, rank: int, world: int, micro_batch: int,
                 shuffle: bool) -> Iterator[Batch]:
        """Micro-batches of `split` from this rank's row groups (of `world`), starting at `state`."""

    def _stream_args(self, split: str, state: LoaderState | None, rank: int, world: int,
                     shuffle: bool) -> dict[str, Any]:
        return dict(split=split, rank=rank, world=world, seed=self.seed, vocab_size=self.spec.vocab_size,
                    shuffle=shuffle, state=state)

    def build_model(self) -> nn.Module:
        why_not = kernels.why_not_triton(self._device()) if self.trainer.kernels.enabled() else None
        if why_not:
            note(f"model.kernels: {why_not}; the PyTorch fallback runs", "pretrain")
        return use_kernels(build_model(self.spec), self.trainer.kernels)

    def _device(self) -> torch.device:
        """The device type the loop will train on (the model is built on the CPU first)."""
        cuda = self.trainer.loop.device != "cpu" and torch.cuda.is_available()
        return torch.device("cuda" if cuda else "cpu")

    def train_batches(self, rank: int, world: int, micro_batch: int,
                      position: dict[str, int] | None) -> Iterator[Batch]:
        state = LoaderState(**position) if position else None
        return self._batches("train", state, rank, world, micro_batch, shuffle=True)

    def val_batches(self, rank: int, world: int, micro_batch: int) -> Iterator[Batch]:
        # One stream dealt out by batch: the val split may have fewer row groups than there are ranks.
        return strided(self._batches("val", None, 0, 1, micro_batch, shuffle=False), rank, world)

    def loss(self, model: nn.Module, inputs: dict[str, torch.Tensor | None]) -> Loss:
        out = model(**inputs)
        return Loss(out.loss, out.lm_loss)

    def val_metrics(self, loss: float) -> dict[str, float]:
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}

    def finish(self, model: nn.Module, device: torch.device, out_dir: Path | None) -> list[Path]:
        """`kernels.json` when the recipe asked for kernels (a stale one from an earlier attempt is removed)."""
        if out_dir is None:
            return []
        path = out_dir / KERNELS_FILE
        path.unlink(missing_ok=True)
        if not self.trainer.kernels.enabled():
            return []
        record = {**self.trainer.kernels.model_dump(), "backend": kernels.backend(device),
                  "triton": _triton_version()}
        path.write_text(json.dumps(record, indent=2) + "\n")
        return [path]

    def _random_ids(self, size: int, device: torch.device) -> torch.Tensor:
        return torch.randint(self.spec.vocab_size, (size, self.spec.seq_len), device=device)


class CausalLM(ShardObjective):
    """GPT: predict every next token of packed windows; the finished model writes samples.txt."""

    def _batches(self, split: str, state: LoaderState | None, rank: int, world: int, micro_batch: int,
                 shuffle: bool) -> Iterator[Batch]:
        stream = TokenStream(self.groups[split], eot_id=self.spec.special_tokens[EOT],
                             **self._stream_args(split, state, rank, world, shuffle))
        return gpt_batches(stream, micro_batch, self.spec.seq_len)

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def dummy_inputs(self, size: int, device: torch.device) -> dict[str, torch.Tensor]:
        ids = self._random_ids(size, device)
        return {"idx": ids, "targets": ids}

    def finish(self, model: nn.Module, device: torch.device, out_dir: Path | None) -> list[Path]:
        """Continuations of the sample prompts, when the tokenizer is at hand (and `kernels.json`)."""
        written = super().finish(model, device, out_dir)
        if not self.trainer.tokenizer_dir or not self.trainer.sample.prompts:
            return written
        path = out_dir / SAMPLES_FILE if out_dir is not None else None
        encoding = load_encoding(Path(self.trainer.tokenizer_dir))
        write_samples(model, encoding, self.trainer.sample, device, self.seed, path)
        return written + ([path] if path is not None else [])


class MaskedLM(ShardObjective):
    """BERT: recover masked tokens of `[CLS] A [SEP] B [SEP]` pairs (and, with NSP, whether B follows A)."""

    def __init__(self, spec: TrainerSpec) -> None:
        super().__init__(spec)
        self.masker = Masker(self.spec, spec.mlm_probability)

    def _batches(self, split: str, state: LoaderState | None, rank: int, world: int, micro_batch: int,
                 shuffle: bool) -> Iterator[Batch]:
        special = self.spec.special_tokens
        ids = PairIds(special["[CLS]"], special["[SEP]"], special["[PAD]"])
        stream = PairStream(self.groups[split], ids=ids, seq_len=self.spec.seq_len, nsp=self.spec.nsp,
                            **self._stream_args(split, state, rank, world, shuffle))
        return bert_batches(stream, micro_batch)

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        return list(model.bert.layers)

    def inputs(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor | None]:
        """Masked afresh each time a batch is used, from the loop's checkpointed generator."""
        arrays = dict(batch.arrays)
        arrays["input_ids"], arrays["mlm_labels"] = self.masker(arrays["input_ids"], generator)
        if not self.spec.nsp:
            arrays.pop("nsp_labels")
        return arrays

    def dummy_inputs(self, size: int, device: torch.device) -> dict[str, torch.Tensor]:
        ids = self._random_ids(size, device)
        zeros = torch.zeros_like(ids)
        return {"input_ids": ids, "segment_ids": zeros, "mlm_labels": ids, "nsp_labels": zeros[:, 0]}


OBJECTIVES: dict[str, type[ShardObjective]] = {"gpt": CausalLM, "bert": MaskedLM}


def make_objective(spec: TrainerSpec) -> ShardObjective:
    return OBJECTIVES[spec.model.arch](spec)


def use_kernels(model: nn.Module, options: KernelsConfig) -> nn.Module:
    """The model with its loss head and LayerNorms on the `kernels` package, as `options` asks (same weights)."""
    model.fused_ce = options.fused_ce
    if options.fused_norm:
        kernels.fuse_layer_norms(model)
    return model


def _triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


class Masker:
    """BERT's masked-LM corruption, drawn afresh for every batch from the generator it is given.

    Of the non-special tokens, each is chosen with `probability`; a chosen token becomes [MASK]
    80% of the time, a random regular token 10%, and stays itself 10%. Labels are the original ids
    at chosen positions and -100 elsewhere.
    """

    def __init__(self, spec: ModelSpec, probability: float) -> None:
        specials = torch.tensor(sorted(set(spec.special_tokens.values())), dtype=torch.long)
        regular = torch.ones(spec.vocab_size, dtype=torch.bool)
        regular[specials[specials < spec.vocab_size]] = False
        self.specials, self.regular = specials, torch.nonzero(regular).squeeze(1)
        self.mask_id, self.probability = spec.special_tokens["[MASK]"], probability

    def __call__(self, input_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(corrupted ids, labels) for a CPU batch of ids."""
        shape, g = input_ids.shape, generator
        chosen = (torch.rand(shape, generator=g) < self.probability) & ~torch.isin(input_ids, self.specials)
        roll = torch.rand(shape, generator=g)
        random_ids = self.regular[torch.randint(len(self.regular), shape, generator=g)]
        corrupted = torch.where(chosen & (roll < 0.8), self.mask_id, input_ids)
        corrupted = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, corrupted)
        return corrupted, torch.where(chosen, input_ids, IGNORE)


def write_samples(model: nn.Module, encoding: Any, sample: SampleConfig, device: torch.device, seed: int,
                  path: Path | None) -> list[str]:
    """Continues each prompt by temperature/top-k sampling (KV-cached); rank 0 passes `path` to write them."""
    generator = torch.Generator(device=device).manual_seed(seed)
    texts = []
    model.eval()
    for prompt in sample.prompts:
        ids = encoding.encode_ordinary(prompt)     # plain text: special-token strings stay text
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        out = model.generate(idx, sample.max_new_tokens, sample.temperature, sample.top_k, generator)
        texts.append(encoding.decode(out[0].tolist(), errors="replace"))
    model.train()
    if path is not None:
        blocks = [f"### sample {i + 1}, prompt {p!r}\n{t}\n" for i, (p, t) in enumerate(zip(sample.prompts, texts))]
        path.write_text("\n".join(blocks))
    return texts
