"""The tokenizer stage's config: train a byte-level BPE, or reuse a fixed tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from storage.configbase import StrictModel

# GPT-4's split pattern (tiktoken's cl100k_base): contractions, letter runs with one leading
# non-letter, numbers of at most three digits, punctuation runs, newlines, whitespace.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
BYTE_TOKENS = 256
MAX_VOCAB = 2**32          # token ids must fit the uint32 shard column
PRETRAINED_NAMES = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")
# What only training reads: with `pretrained` set these change nothing. A fixed tokenizer reads no
# documents (so it is the same for every data variant of an ablation), hence no held-out statistics.
TRAINING_ONLY = ("vocab_size", "max_train_chars", "sources", "train_fraction", "heldout_docs", "max_doc_chars")


class TokenizerConfig(StrictModel):
    """Train a byte-level BPE with rustbpe (the default), or reuse `pretrained` as it is.

    `pretrained` is a tiktoken name (`gpt2`, `cl100k_base`, ...; its file must already be in the
    tiktoken cache, nothing is downloaded), a directory written by this stage, or a `.tiktoken`
    rank file (split with `pattern`). A fixed tokenizer reads no documents, so every data variant
    of an ablation shares it; its training fields (`vocab_size`, `max_train_chars`, `sources`,
    `train_fraction`, `heldout_docs`, `max_doc_chars`, and `pattern` unless it splits a rank file)
    change nothing: setting one to anything but its default is an error, and they stay out of the
    fingerprint. `special_tokens` still apply. `from_recipe: <recipe.yaml>` uses exactly the
    tokenizer that recipe's tokenizer stage builds (the planner borrows that stage, fingerprint and
    inputs included), so a grid trains one tokenizer for all its variants.
    `vocab_size` counts the 256 byte tokens, the learned merges and the special tokens.
    """

    pretrained: str | None = None
    from_recipe: str | None = Field(None, description="use the tokenizer this other recipe's tokenizer stage "
                                    "builds: the same output, built once for every recipe naming it")
    vocab_size: int = 8192
    pattern: str = GPT4_PATTERN
    special_tokens: list[str] = ["<|endoftext|>"]
    max_train_chars: int = Field(2_000_000_000, gt=0)   # stop reading training text here
    max_doc_chars: int = Field(10_000, gt=0)           # longer documents are cut for training
    sources: list[str] | None = None                   # train only on documents of these sources
    train_fraction: float = Field(1.0, gt=0, le=1)     # share of documents (by id hash) to train on
    heldout_docs: int = Field(1000, ge=0)              # documents kept out of training for the stats

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, pattern: str) -> str:
        """tiktoken splits with it and the HF export (Oniguruma) must too: checked before hours of training."""
        from .files import pattern_problem
        from .hf import onig_regex

        problem = pattern_problem(pattern)
        if problem:
            raise ValueError(f"pattern is not a valid split regex: {problem}")
        onig_regex(pattern)    # a ValueError saying why tokenizer.json could not express it
        return pattern

    @field_validator("special_tokens")
    @classmethod
    def _specials_distinct(cls, specials: list[str]) -> list[str]:
        if any(not s for s in specials):
            raise ValueError("special_tokens: an entry is the empty string")
        if len(set(specials)) != len(specials):
            raise ValueError(f"special_tokens: duplicate entries in {specials}")
        return specials

    @field_validator("sources")
    @classmethod
    def _sources_not_empty(cls, sources: list[str] | None) -> list[str] | None:
        if sources is not None and not sources:
            raise ValueError("sources: give at least one source, or leave it unset to use all")
        return sources

    def unused_fields(self) -> frozenset[str]:
        """The fields that cannot change the output of this config (training fields of a pretrained one)."""
        if self.from_recipe:
            return frozenset(set(type(self).model_fields) - {"from_recipe"})   # that recipe's tokenizer decides
        if not self.pretrained:
            return frozenset()
        unused = set(TRAINING_ONLY)
        if not self.splits_rank_file():
            unused.add("pattern")
        return frozenset(unused)

    def splits_rank_file(self) -> bool:
        """`pretrained` names a bare `.tiktoken` rank file, which `pattern` splits (names and directories bring their own)."""
        return self.pretrained not in PRETRAINED_NAMES and not Path(str(self.pretrained)).expanduser().is_dir()

    def output_fields(self) -> dict[str, Any]:
        """The fields that change the output: the unused ones are left out."""
        return {name: value for name, value in super().output_fields().items() if name not in self.unused_fields()}

    @model_validator(mode="after")
    def _no_unused_fields(self) -> "TokenizerConfig":
        # A value equal to the default is harmless (and a full dump of a valid config re-validates).
        changed = sorted(name for name in self.unused_fields()
                         if getattr(self, name) != type(self).model_fields[name].default)
        if changed:
            verb, pronoun = ("are", "them") if len(changed) > 1 else ("is", "it")
            source = f"from_recipe={self.from_recipe!r}" if self.from_recipe else f"pretrained={self.pretrained!r}"
            raise ValueError(f"{', '.join(changed)} {verb} unused when {source} is set (the vocabulary comes "
                             f"from it); remove {pronoun} from the recipe")
        return self

    @model_validator(mode="after")
    def _vocab_fits(self) -> "TokenizerConfig":
        if self.pretrained or self.from_recipe:
            return self     # the pretrained vocabulary decides the size
        smallest = BYTE_TOKENS + len(self.special_tokens)
        if self.vocab_size < smallest:
            raise ValueError(f"vocab_size={self.vocab_size} is smaller than the {BYTE_TOKENS} byte tokens "
                             f"plus {len(self.special_tokens)} special tokens = {smallest}")
        if self.vocab_size > MAX_VOCAB:
            raise ValueError(f"vocab_size={self.vocab_size} exceeds 2**32 = {MAX_VOCAB}: token ids must fit uint32")
        return self
