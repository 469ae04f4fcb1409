"""The dedup recipe: MinHash (FineWeb's parameters), exact duplicates, decontamination against eval sets."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from storage.configbase import StrictModel, SwitchableStep
from tasks.docpipe.config import ExecutorConfig


class MinhashConfig(SwitchableStep):
    """datatrove's four MinHash stages; FineWeb: word 5-grams, 14 buckets x 8 hashes, 64-bit sha1."""

    n_grams: int = Field(5, ge=1)
    num_buckets: int = Field(14, ge=1)
    hashes_per_bucket: int = Field(8, ge=1)
    hash_fc: Literal["sha1", "xxhash"] = "sha1"
    precision: Literal[32, 64] = 64
    seed: int = Field(1, description="seed of the MinHash permutations (not the pipeline seed)")
    language: str = Field("en", description="word tokenizer for the shingles")


class ExactConfig(SwitchableStep):
    """Exact duplicates of the normalized text (lowercase, no punctuation, numbers and spaces folded)."""

    enabled: bool = False


class DecontaminateConfig(SwitchableStep):
    """Drop (or only flag) documents sharing an n-gram with an evaluation set (GLUE .tsv, SQuAD .json, or the
    evaluate stage's ARC/PIQA/WinoGrande/LAMBADA/HellaSwag/SWAG .jsonl; SWAG also as .csv or a .json array)."""

    enabled: bool = False
    eval_sets: list[Path] = []
    n_gram: int = Field(13, ge=1)
    mode: Literal["drop", "flag"] = "drop"
    language: str = "en"

    @model_validator(mode="after")
    def _needs_eval_sets(self) -> "DecontaminateConfig":
        if self.enabled and not self.eval_sets:
            raise ValueError("decontaminate.eval_sets must list at least one file when decontaminate is enabled")
        return self


class DedupConfig(StrictModel):
    """MinHash near-duplicates, exact duplicates and decontamination, each a switch."""

    minhash: MinhashConfig = MinhashConfig()
    exact: ExactConfig = ExactConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()
    executor: ExecutorConfig = ExecutorConfig()
