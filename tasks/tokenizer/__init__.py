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

STAGE = Stage(name="tokenizer", version=VERSION, config=TokenizerConfig, run=deferred("tasks.tokenizer.stage:run"),
              optional_reads=("documents",), external_inputs=external_inputs)   # a pretrained one needs none
run = STAGE.run
__all__ = ["CONFIG_FILE", "GPT4_PATTERN", "HF_FILE", "RANKS_FILE", "STAGE", "VERSION", "TokenizerConfig",
           "Vocabulary", "external_inputs", "load_encoding", "read_vocabulary", "run"]
