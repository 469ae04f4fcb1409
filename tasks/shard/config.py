"""The shard stage's config: how documents become Parquet token shards."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from storage.configbase import StrictModel


class ShardConfig(StrictModel):
    """How documents become token shards.

    `val_fraction` 0.005: one document in 200 is validation, enough for a stable validation loss
    (about 5M tokens of a 1B-token corpus, ~50 documents of the 10k-article demo) while costing
    the training set almost nothing; the split is by document, so no text leaks across it.
    `max_tokens_per_doc` bounds a row (2**20 tokens = 2-4 MiB) so row groups stay streamable; a
    longer document is split into rows `<id>#0, <id>#1, ...` (no token lost) or truncated.
    """

    val_fraction: float = Field(0.005, ge=0, lt=1)
    max_tokens_per_doc: int | None = Field(2**20, gt=0)
    overlong: Literal["split", "truncate"] = "split"
    target_shard_bytes: int = Field(128 * 2**20, gt=0)   # token bytes per shard file, before compression
    row_group_rows: int = Field(1024, gt=0)
    workers: int = Field(0, ge=0)                        # encoding threads; 0 = one per core
    batch_size: int = Field(256, gt=0)                   # documents per encoding task

    non_output_fields = frozenset({"workers", "batch_size"})
