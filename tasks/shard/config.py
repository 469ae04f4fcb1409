"""The shard stage's config: how documents become Parquet token shards."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from storage.configbase import StrictModel


class ShardConfig(StrictModel):
    """How documents become token shards.

    `val_fraction` 0.005: one document in 200 is validation, enough for a stable validation loss
    (about 5M tokens of a 1B-token corpus, ~50 documents of the 10k-article demo) while costing
    the training set almost nothing; the split is by document, so no text leaks across it.
    `max_tokens_per_doc` bounds a row (2**20 tokens = 2-4 MiB) so row groups stay streamable; a
    longer document is split into rows `<id>#0, <id>#1, ...` (no token lost) or truncated.

    `mixture` ({source: weight}, Dolma/DCLM-style) gives each source `weight / sum(weights)` of the
    training tokens: `mixture_tokens` of them, by default as many as the sources have together
    (so a mixture redistributes the training set instead of resizing it). A source asked for more
    than it has repeats its documents (whole epochs plus a seeded share of documents once more), one
    asked for less keeps a seeded share of them; a source left out of the mixture gives no training
    tokens. Validation rows are never mixed or repeated: every mixture is judged on the same
    natural validation split. Without `mixture` the output is exactly the unmixed shards.
    """

    val_fraction: float = Field(0.005, ge=0, lt=1)
    max_tokens_per_doc: int | None = Field(2**20, gt=0)
    overlong: Literal["split", "truncate"] = "split"
    target_shard_bytes: int = Field(128 * 2**20, gt=0)   # token bytes per shard file, before compression
    row_group_rows: int = Field(1024, gt=0)
    workers: int = Field(0, ge=0)                        # encoding threads; 0 = one per core
    batch_size: int = Field(256, gt=0)                   # documents per encoding task
    mixture: dict[str, float] | None = Field(None, description="training tokens by source weight: {source: weight}")
    mixture_tokens: int | None = Field(None, gt=0, description="training tokens of the mixture; default: "
                                       "the sources' natural training total")

    non_output_fields = frozenset({"workers", "batch_size"})

    @model_validator(mode="after")
    def _mixture_is_usable(self) -> "ShardConfig":
        if self.mixture is None:
            if self.mixture_tokens is not None:
                raise ValueError("mixture_tokens sizes a mixture; without `mixture` it does nothing: remove it")
            return self
        if not self.mixture:
            raise ValueError("mixture: name at least one source and its weight (or remove `mixture`)")
        bad = {source: weight for source, weight in self.mixture.items() if not 0 < weight < float("inf")}
        if bad:
            raise ValueError(f"mixture: weights must be positive numbers; got {bad} (leave a source out to "
                             "give it no training tokens)")
        return self

    def mixture_shares(self) -> dict[str, float]:
        """Each mixed source's share of the training tokens: its weight over the sum, by source name."""
        total = sum(self.mixture.values()) if self.mixture else 0.0
        return {source: self.mixture[source] / total for source in sorted(self.mixture or {})}

    def output_fields(self) -> dict[str, Any]:
        """Without a mixture, the fields (and so the fingerprint) of the unmixed stage; with one, its shares.

        Weights {a: 1, b: 3} and {a: 2, b: 6} ask for the same shares, so they name the same output.
        """
        data = super().output_fields()
        if self.mixture is None:
            del data["mixture"], data["mixture_tokens"]
        else:
            data["mixture"] = self.mixture_shares()
        return data
