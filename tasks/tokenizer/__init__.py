"""The tokenizer stage: a byte-level BPE trained with rustbpe (or reused), saved for tiktoken and HF."""
from .config import GPT4_PATTERN, TokenizerConfig
from .files import CONFIG_FILE, HF_FILE, RANKS_FILE, Vocabulary, load_encoding, read_vocabulary
from .pretrained import external_inputs
from .stage import VERSION, run

__all__ = ["CONFIG_FILE", "GPT4_PATTERN", "HF_FILE", "RANKS_FILE", "VERSION", "TokenizerConfig", "Vocabulary",
           "external_inputs", "load_encoding", "read_vocabulary", "run"]
