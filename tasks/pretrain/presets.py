"""Model presets: the shapes of published models, and tiny ones for tests and CPU demos.

`reference_vocab` and `published_params` are what the original paper or its released checkpoint
used; a test builds each preset with that vocabulary and checks its parameter count against the
figure. In a pipeline run the vocabulary comes from the tokenizer instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Preset:
    arch: Literal["gpt", "bert"]
    n_layer: int
    n_head: int
    d_model: int
    d_mlp: int
    seq_len: int                      # also the number of learned positions
    reference_vocab: int
    published_params: int | None      # None: no published figure (the shape is our own)
    params_tolerance: float = 0.0     # relative; 0 means the count must match exactly
    source: str = ""


PRESETS: dict[str, Preset] = {
    # Tiny shapes that train in seconds on a CPU (tests, smoke runs).
    "gpt-nano": Preset("gpt", 2, 2, 64, 256, 64, 256, None, source="lmforge test shape"),
    "bert-nano": Preset("bert", 2, 2, 64, 256, 64, 256, None, source="lmforge test shape"),
    # nanoGPT's shakespeare-char shape (6 layers, 384 wide, 6 heads, block 256): the CPU demo.
    "gpt-mini": Preset("gpt", 6, 6, 384, 1536, 256, 65, None, source="nanoGPT train_shakespeare_char"),
    # Google's BERT-Mini (L=4, H=256), "11.3M" in the BERT miniatures README.
    "bert-mini": Preset("bert", 4, 4, 256, 1024, 512, 30522, 11_300_000, 0.02,
                        "google-research/bert README, BERT miniatures"),
    # GPT-1: 12 layers, 768, 12 heads, 3072 MLP, 512 positions, 40,478 BPE tokens; "117M".
    "gpt1": Preset("gpt", 12, 12, 768, 3072, 512, 40478, 117_000_000, 0.01, "Radford et al. 2018"),
    # GPT-2 small and XL as released (HF `gpt2`, `gpt2-xl` parameter counts, tied embeddings).
    "gpt2-124m": Preset("gpt", 12, 12, 768, 3072, 1024, 50257, 124_439_808, source="HF gpt2"),
    "gpt2-1.5b": Preset("gpt", 48, 25, 1600, 6400, 1024, 50257, 1_557_611_200, source="HF gpt2-xl"),
    # BERT base and large as released (HF BertModel with pooler: 109,482,240 and 335,141,888).
    "bert-base": Preset("bert", 12, 12, 768, 3072, 512, 30522, 109_482_240, source="HF bert-base-uncased"),
    "bert-large": Preset("bert", 24, 16, 1024, 4096, 512, 30522, 335_141_888, source="HF bert-large-uncased"),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
