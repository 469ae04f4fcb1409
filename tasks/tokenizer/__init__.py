"""tokenizer: a byte-level BPE trained with rustbpe (or a fixed one reused), saved for tiktoken and HF.

Output: `tokenizer.tiktoken` (ranks), `tokenizer_config.json` (`storage.formats.TokenizerFile`) and an HF
`tokenizer.json` with identical ids; `tasks.tokenizer.files.load_encoding(dir)` loads it offline.
"""
from __future__ import annotations

from storage.stage import Stage, deferred
from tasks.tokenizer.config import GPT4_PATTERN, TokenizerConfig
from tasks.tokenizer.files import CONFIG_FILE, HF_FILE, RANKS_FILE, Vocabulary, load_encoding, read_vocabulary
from tasks.tokenizer.pretrained import external_inputs

VERSION = "2"   # 2: held-out and train_fraction choice by storage.sampling.unit_hash



def reads(config: TokenizerConfig) -> tuple[str, ...]:
    """Training reads the documents; a fixed tokenizer reads nothing, so it is the same for every data variant."""
    return () if config.pretrained or config.from_recipe else ("documents",)


STAGE = Stage(name="tokenizer", version=VERSION, config=TokenizerConfig, run=deferred("tasks.tokenizer.stage:run"),
              reads=reads, external_inputs=external_inputs,
              headline=("vocab_size", "bytes_per_token"))
run = STAGE.run
__all__ = ["CONFIG_FILE", "GPT4_PATTERN", "HF_FILE", "RANKS_FILE", "STAGE", "VERSION", "TokenizerConfig",
           "Vocabulary", "external_inputs", "load_encoding", "read_vocabulary", "run"]
