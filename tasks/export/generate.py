"""`lmforge generate`: KV-cached sampling from a trained GPT, streamed to the terminal token by token.

Each step runs only the new token through the model (its keys and values are cached); past
`seq_len` tokens the learned positions run out, so from there each step reruns the last `seq_len`
tokens, as `GPT.generate` does. Token bytes are decoded incrementally, so a character split across
tokens is printed whole. Generation stops at end-of-text or after `max_new_tokens`.
"""
from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import tiktoken
import torch

from storage.stage import StageError
from tasks.export.source import ModelSource, resolve_source
from tasks.models import GPT
from tasks.models.gpt import sample_next
from tasks.models.layers import KVCache
from tasks.tokenizer import load_encoding
from tasks.training.runtime import choose_device

EOT = "<|endoftext|>"


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 100
    temperature: float = 0.8          # 0: greedy
    top_k: int | None = 40
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.temperature < 0 or (self.top_k is not None and self.top_k < 1):
            raise StageError(f"sampling: max_new_tokens and temperature must be >= 0 and top_k >= 1 ({self})")


@dataclass(frozen=True)
class Completion:
    prompt: str
    text: str
    tokens: int
    stop: str                         # "eot" or "length"


def stream_ids(model: GPT, prompt_ids: list[int], sampling: Sampling,
               generator: torch.Generator | None = None, use_cache: bool = True) -> Iterator[int]:
    """New token ids, one at a time; padded vocabulary ids are never drawn."""
    device = model.wte.weight.device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = None
    with torch.no_grad():
        for _ in range(sampling.max_new_tokens):
            logits, cache = _next_logits(model, idx, cache if use_cache else None, use_cache)
            next_id = sample_next(logits[:, : model.spec.vocab_size], sampling.temperature, sampling.top_k, generator)
            yield int(next_id)
            idx = torch.cat([idx, next_id], dim=1)


def _next_logits(model: GPT, idx: torch.Tensor, cache: KVCache | None,
                 use_cache: bool) -> tuple[torch.Tensor, KVCache | None]:
    """Logits after `idx`; the cache holds what it has seen, or is dropped once the window slides."""
    seq_len = model.spec.seq_len
    if not use_cache or idx.shape[1] > seq_len:
        return model(idx[:, -seq_len:]).logits[:, -1], None
    if cache is None:
        cache = KVCache(len(model.blocks), seq_len)
    return model(idx[:, cache.length:], cache=cache).logits[:, -1], cache


class Generator:
    """A GPT and its tokenizer, loaded once for many prompts; one seeded random stream for all of them."""

    def __init__(self, source: ModelSource, device: str = "auto", sampling: Sampling = Sampling()) -> None:
        try:
            self.device = choose_device(device, 0)
        except RuntimeError as err:
            raise StageError(str(err)) from None
        self.model = source.load_gpt(self.device)
        self.encoding = load_encoding(source.tokenizer_dir)
        self.sampling = sampling
        self.generator = torch.Generator(device=self.device).manual_seed(sampling.seed)

    def complete(self, prompt: str, out: TextIO | None = None) -> Completion:
        """The prompt's continuation; with `out`, each piece of text is written (and flushed) as it comes."""
        eot = self.model.spec.special_tokens.get(EOT)
        ids = self.encoding.encode_ordinary(prompt) or [eot]      # an empty prompt starts a new document
        generated: list[int] = []

        def until_eot() -> Iterator[int]:
            for token in stream_ids(self.model, ids, self.sampling, self.generator):
                if token == eot:
                    return
                generated.append(token)
                yield token

        pieces = []
        for piece in decode_stream(self.encoding, until_eot()):
            pieces.append(piece)
            _emit(out, piece)
        stop = "eot" if len(generated) < self.sampling.max_new_tokens else "length"
        return Completion(prompt, "".join(pieces), len(generated), stop)


def decode_stream(encoding: tiktoken.Encoding, ids: Iterable[int]) -> Iterator[str]:
    """Text as ids arrive; a character whose UTF-8 bytes span several tokens comes out whole, once complete."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in ids:
        piece = decoder.decode(encoding.decode_single_token_bytes(token))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def _emit(out: TextIO | None, piece: str) -> None:
    if out is not None and piece:
        out.write(piece)
        out.flush()


def read_prompts(path: Path | str) -> list[str]:
    """One prompt per line (blank lines skipped); `\\n` in a line stands for a newline."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: prompts file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise StageError(f"{path}: no prompts (one per line)")
    return prompts


def generate(stage_dir: Path, prompts: list[str], sampling: Sampling, out: TextIO, fmt: str = "text",
             tokenizer: Path | None = None, device: str = "auto", prompts_file: Path | None = None) -> list[Completion]:
    """What `lmforge generate` does: text streams prompt + continuation; jsonl writes one object per prompt."""
    prompts = [*prompts, *(read_prompts(prompts_file) if prompts_file is not None else [])]
    if not prompts:
        raise StageError("nothing to continue: give --prompt TEXT or --prompts-file FILE")
    if fmt not in ("text", "jsonl"):
        raise StageError(f"--format {fmt!r}: expected text or jsonl")
    model = Generator(resolve_source(stage_dir, tokenizer), device, sampling)
    completions = []
    for number, prompt in enumerate(prompts):
        if fmt == "text":
            _emit(out, ("\n---\n" if number else "") + prompt)
        completion = model.complete(prompt, out if fmt == "text" else None)
        completions.append(completion)
        _emit(out, "\n" if fmt == "text" else json.dumps(completion.__dict__, ensure_ascii=False) + "\n")
    return completions
