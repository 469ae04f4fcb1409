"""Source mixtures by token weight (`shard.mixture`, Dolma/DCLM-style): how many times each training row is written.

A mixture asks source `s` for `target_s = share_s x target_tokens` training tokens, where it has
`available_s`; that is `e_s = target_s / available_s` epochs of it. Every training row of `s` is
written `floor(e_s)` times, and once more when `unit_hash("shard-mixture:<seed>", doc_id)` falls below
the fraction `e_s - floor(e_s)`: a downweighted source (`e_s < 1`) keeps a seeded share of its
documents, an upweighted one repeats them in whole epochs plus a seeded share. The hash is of the
document id, so the parts of a split document stay together, and the shares are nested: a larger
weight keeps every document a smaller one kept. Validation rows are written once, mixture or not.

The work takes two passes. The documents are encoded once into unmixed shards in the stage's
scratch directory (the available tokens per source are known only then); the output is then
written from them in rounds: round 0 writes every row that is written at all, under its own id,
round k > 0 the k-th repeats, ids `<row id>@<k>`. Repeats are so spread over the whole output
rather than next to their originals, and the pretrain loader's row-group shuffle mixes them further.
"""
from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.formats import Mixture, MixtureSource
from storage.sampling import unit_hash
from storage.stage import StageError, StageResult
from tasks.shard.config import ShardConfig

MIXTURE_SALT = "shard-mixture"
REPEAT_ID_FORMAT = "<row id>@<k>"
MIXTURE_RULE = (f"a training row of source s is written floor(e_s) + [unit_hash('{MIXTURE_SALT}:<seed>', doc_id) < "
                "e_s - floor(e_s)] times, e_s = target_tokens_s / available_tokens_s (doc_id: the document's id, "
                "before any '#<part>'); copy k > 0 is named '<row id>@<k>'; validation rows are written once")
UNMIXED_DIR = "unmixed"          # under the stage's scratch directory
UNMIXED_COMPRESSION = "none"     # read back once per round, deleted at the end: speed over size


def mixture_salt(seed: int) -> str:
    """The mixture's own salt: its draws are independent of the split's and of every upstream sample."""
    return f"{MIXTURE_SALT}:{seed}"


@dataclass(frozen=True)
class SourcePlan:
    """What the mixture asks of one source."""

    share: float
    available: int
    target: int

    @property
    def epochs(self) -> float:
        return self.target / self.available if self.available else 0.0

    def copies(self, draw: float) -> int:
        """Times a training row is written, given its document's draw in [0, 1)."""
        whole = math.floor(self.epochs)
        return whole + (draw < self.epochs - whole)


def plan_mixture(config: ShardConfig, available: dict[str, int]) -> dict[str, SourcePlan]:
    """Each source's share, available and target training tokens (a source left out gets none).

    Sources are checked against the documents first (`tokenizer.corpus.check_sources_exist`); one whose documents are all
    empty or all in validation has no entry in `available`.
    """
    shares = config.mixture_shares()
    empty = sorted(source for source in shares if not available.get(source))
    if empty:
        raise StageError(f"shard.mixture gives weight to {', '.join(map(repr, empty))}, which has no training "
                         "tokens (all its documents are empty or in the validation split): nothing to repeat")
    total = target_tokens(config, available)
    return {source: SourcePlan(shares.get(source, 0.0), available[source], round(total * shares.get(source, 0.0)))
            for source in sorted(available)}


def target_tokens(config: ShardConfig, available: dict[str, int]) -> int:
    """The mixture's training tokens: `mixture_tokens`, else as many as all sources have (left-out ones too)."""
    return config.mixture_tokens or sum(available.values())


# --- writing the mixture ---------------------------------------------------------------------------

@dataclass(frozen=True)
class UnmixedRows:
    """One row group of the unmixed shards: ids, sources, splits and each row's tokens."""

    doc_ids: list[str]
    sources: list[str]
    splits: list[str]
    values: np.ndarray
    starts: np.ndarray

    def tokens(self, index: int) -> np.ndarray:
        return self.values[self.starts[index]: self.starts[index + 1]]


def read_unmixed(path: Path, index: int) -> UnmixedRows:
    # One decoding thread, no pre-buffering: the encoders' threads are done, and Arrow's per-thread
    # allocator caches would otherwise grow with the number of row groups read.
    table = pq.ParquetFile(path, pre_buffer=False).read_row_group(index, use_threads=False)
    tokens = table["tokens"].combine_chunks()
    lengths = pc.list_value_length(tokens).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return UnmixedRows(table["doc_id"].to_pylist(), table["source"].to_pylist(), table["split"].to_pylist(),
                       pc.list_flatten(tokens).to_numpy(zero_copy_only=False), starts)


def row_groups(files: list[Path]) -> Iterator[tuple[Path, int]]:
    for path in files:
        for index in range(pq.ParquetFile(path).metadata.num_row_groups):
            yield path, index


def row_copies(rows: UnmixedRows, plans: dict[str, SourcePlan], salt: str) -> np.ndarray:
    """Times each row of a row group is written: once for validation, by its source's plan for training."""
    return np.array([1 if split == "val" else plans[source].copies(unit_hash(salt, doc_id))
                     for doc_id, source, split in zip(rows.doc_ids, rows.sources, rows.splits)], dtype=np.int64)


def rounds(files: list[Path], plans: dict[str, SourcePlan], salt: str) -> Iterator[tuple[int, UnmixedRows, np.ndarray]]:
    """(round k, row group, each row's copies) for every row group holding a row written in round k."""
    copies: list[np.ndarray] = []
    for path, index in row_groups(files):                 # round 0 reads everything once and keeps the counts
        rows = read_unmixed(path, index)
        copies.append(row_copies(rows, plans, salt))
        yield 0, rows, copies[-1]
    last = max((math.ceil(plan.epochs) for plan in plans.values()), default=1)
    for k in range(1, last):
        for (path, index), counts in zip(row_groups(files), copies):
            if (counts > k).any():
                yield k, read_unmixed(path, index), counts


def drop_reason(plan: SourcePlan) -> str:
    return "dropped/shard/mixture" if plan.share else "dropped/shard/not_in_mixture"


def mixture_record(plans: dict[str, SourcePlan], by_source: dict[str, dict[str, int]], seed: int,
                   total: int) -> Mixture:
    """The manifest's account of the mixture: asked for, and written."""
    sources = {}
    for source, plan in plans.items():
        written = by_source.get(source, {}).get("train", 0)
        sources[source] = MixtureSource(share=plan.share, available_tokens=plan.available, target_tokens=plan.target,
                                        tokens=written, epochs=written / plan.available if plan.available else 0.0)
    return Mixture(seed=seed, rule=MIXTURE_RULE, repeat_id_format=REPEAT_ID_FORMAT, target_tokens=total,
                   sources=sources)


def count_mixture(result: StageResult, mixture: Mixture) -> None:
    """`mixture/<source>/{tokens,epochs,share,target_tokens,available_tokens}`: stats, hence MLflow and the catalog."""
    result.count("mixture/target_tokens", mixture.target_tokens)
    for source, outcome in mixture.sources.items():
        for name in ("tokens", "epochs", "share", "target_tokens", "available_tokens"):
            result.count(f"mixture/{source}/{name}", getattr(outcome, name))
    for name in ("dropped/shard/mixture", "dropped/shard/not_in_mixture", "rows_repeated"):
        result.count(name, 0)


def clean(directory: Path) -> Path:
    """`directory`, emptied: the unmixed shards of an interrupted attempt are written afresh."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory
