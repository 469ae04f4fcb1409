"""Streaming loaders over the Parquet token shards: GPT windows and BERT sentence pairs.

The unit of work is one row group. Every epoch the row groups holding the split are shuffled with
the seed and dealt out round-robin, so each rank reads its own row groups and no two ranks read the
same one. A rank's stream is endless (epochs repeat) and seekable: `LoaderState` (epoch, row group,
offset) is all a checkpoint needs to continue exactly where it stopped. Only one row group per rank
is in memory at a time.

Each training batch says how many document tokens of its split the loader passed over to make it
(`Batch.consumed`), so the loop can report epochs: the tokens passed over by all ranks / the split's
document tokens (the manifest's `tokens_train`). GPT: the window's tokens less the end-of-text
separators the loader inserted. BERT: the tokens of the chunks its pairs were cut from (an NSP pair's
random B is read where it lives, not counted twice), a row group's leftovers (1-token tails that
make no pair) counted with its last pair.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.formats import ShardManifest
from tasks.training.batches import Batch

MANIFEST = "manifest.json"
IS_NEXT, NOT_NEXT = 0, 1            # next-sentence labels, in the HF convention


class ShardDataError(RuntimeError):
    """A shard that cannot be read or holds impossible token ids; the message names file and row group."""


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int

    def __str__(self) -> str:
        return f"{self.path} row group {self.index}"


@dataclass
class LoaderState:
    """Where a rank's stream stands: the epoch, its row group in that epoch, and what it took of it."""

    epoch: int = 0
    unit: int = 0
    offset: int = 0       # tokens (GPT) or examples (BERT) already taken from that row group

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def read_manifest(shard_dir: Path) -> ShardManifest:
    """The shard stage's `manifest.json`; a bad one raises `FileFormatError` naming the file and field."""
    return ShardManifest.read(Path(shard_dir) / MANIFEST)


def shard_paths(shard_dir: Path, manifest: ShardManifest) -> list[Path]:
    return [Path(shard_dir) / entry.path for entry in manifest.shards]


def split_row_groups(paths: list[Path], split: str) -> list[RowGroup]:
    """The row groups holding at least one `split` row, in file order.

    Decided from the `split` column's min/max statistics where the writer kept them (they are
    "train" <= x <= "val"); otherwise by reading that one column.
    """
    groups = []
    for path in paths:
        parquet = pq.ParquetFile(path)
        column = parquet.schema_arrow.get_field_index("split")
        for index in range(parquet.metadata.num_row_groups):
            if _row_group_has(parquet, index, column, split):
                groups.append(RowGroup(str(path), index))
    return groups


def _row_group_has(parquet: pq.ParquetFile, index: int, column: int, split: str) -> bool:
    if parquet.metadata.row_group(index).num_rows == 0:
        return False
    stats = parquet.metadata.row_group(index).column(column).statistics
    if stats is not None and stats.has_min_max:
        low, high = (v.decode() if isinstance(v, bytes) else v for v in (stats.min, stats.max))
        return low <= split <= high
    values = parquet.read_row_group(index, columns=["split"])["split"]
    return bool(pc.any(pc.equal(values, split)).as_py())


def read_documents(group: RowGroup, split: str, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The token ids of a row group's `split` documents, concatenated, and each document's length."""
    try:
        table = pq.ParquetFile(group.path).read_row_group(group.index, columns=["doc_id", "split", "tokens"])
    except (OSError, pa.ArrowException) as exc:
        raise ShardDataError(f"{group}: cannot be read: {exc}") from exc
    table = table.filter(pc.equal(table["split"], split))
    tokens = table["tokens"].combine_chunks() if table.num_rows else pa.array([], pa.list_(pa.uint32()))
    lengths = pc.list_value_length(tokens).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(tokens).to_numpy(zero_copy_only=False)
    if values.size and int(values.max()) >= vocab_size:
        first = int(np.argmax(values >= vocab_size))
        doc_id = table["doc_id"][int(np.searchsorted(np.cumsum(lengths), first, side="right"))].as_py()
        raise ShardDataError(f"{group}: document {doc_id!r} holds token id {int(values[first])}, "
                             f"outside the manifest's vocab_size {vocab_size}")
    return values, lengths


def rank_row_groups(n_groups: int, epoch: int, seed: int, rank: int, world: int,
                    shuffle: bool = True) -> list[int]:
    """Indices of this rank's row groups for `epoch`: a seeded shuffle dealt out round-robin."""
    order = np.random.default_rng([seed, epoch]).permutation(n_groups) if shuffle else np.arange(n_groups)
    return [int(i) for i in order[rank::world]]


class _RowGroupStream(ABC):
    """The walk over a rank's row groups, epoch after epoch; subclasses say what a row group yields."""

    def __init__(self, groups: list[RowGroup], split: str, rank: int, world: int, seed: int,
                 vocab_size: int, shuffle: bool = True, state: LoaderState | None = None) -> None:
        if len(groups) < world:
            raise ShardDataError(f"{len(groups)} row groups hold {split!r} rows but there are {world} ranks; "
                                 "write shards with more, smaller row groups or use fewer processes")
        self.groups, self.split, self.rank, self.world = groups, split, rank, world
        self.seed, self.vocab_size, self.shuffle = seed, vocab_size, shuffle
        self.state = LoaderState(**asdict(state)) if state else LoaderState()
        self._loaded: tuple[int, int] | None = None
        self._items: Any = None

    @abstractmethod
    def _load(self, group_index: int, epoch: int) -> Any:
        """What row group `group_index` yields in `epoch` (a sized sequence)."""

    def _mine(self) -> list[int]:
        return rank_row_groups(len(self.groups), self.state.epoch, self.seed, self.rank, self.world, self.shuffle)

    def _current(self) -> Any:
        """The items of the row group the state points at, loaded once."""
        key = (self.state.epoch, self.state.unit)
        if self._loaded != key:
            self._items = self._load(self._mine()[self.state.unit], self.state.epoch)
            self._loaded = key
        return self._items

    def _advance(self) -> None:
        """Moves to the next row group, wrapping into the next epoch."""
        self.state.offset = 0
        self.state.unit += 1
        if self.state.unit >= len(self._mine()):
            self.state.epoch, self.state.unit = self.state.epoch + 1, 0

    def _items_left(self) -> Any:
        """The current row group's items, moving past exhausted or empty ones."""
        for _ in range(2 * len(self.groups) + 1):
            items = self._current()
            if self.state.offset < len(items):
                return items
            self._advance()
        raise ShardDataError(f"rank {self.rank} found no {self.split!r} data in its row groups")


class TokenStream(_RowGroupStream):
    """A rank's endless stream of tokens: each row group's documents joined by the EOT id."""

    def __init__(self, *args: Any, eot_id: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eot_id = eot_id

    def _load(self, group_index: int, epoch: int) -> np.ndarray:
        values, lengths = read_documents(self.groups[group_index], self.split, self.vocab_size)
        return join_documents(values, lengths, self.eot_id)

    def take(self, count: int) -> np.ndarray:
        """The next `count` tokens, crossing row groups and epochs as needed."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            tokens = self._items_left()
            piece = tokens[self.state.offset: self.state.offset + count - filled]
            out[filled: filled + len(piece)] = piece
            filled += len(piece)
            self.state.offset += len(piece)
        return out


def join_documents(values: np.ndarray, lengths: np.ndarray, eot_id: int) -> np.ndarray:
    """Documents back to back, each followed by `eot_id`; empty documents are dropped."""
    lengths = lengths[lengths > 0]
    out = np.full(len(values) + len(lengths), eot_id, dtype=np.int64)
    is_token = np.ones(len(out), dtype=bool)
    is_token[np.cumsum(lengths + 1) - 1] = False
    out[is_token] = values
    return out


@dataclass(frozen=True)
class PairIds:
    cls: int
    sep: int
    pad: int


class PairStream(_RowGroupStream):
    """A rank's endless stream of BERT inputs `[CLS] A [SEP] B [SEP]` built from its documents.

    Each document is cut into chunks of up to `seq_len - 3` tokens; a chunk is split at a random
    point into A and B. With NSP, half the time B is replaced by a span of another document of the
    same row group (label NOT_NEXT). The random draws are seeded by (seed, epoch, row group), so a
    row group always yields the same examples in the same epoch and resuming needs only an offset.
    """

    def __init__(self, *args: Any, ids: PairIds, seq_len: int, nsp: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ids, self.seq_len, self.nsp = ids, seq_len, nsp

    def _load(self, group_index: int, epoch: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
        values, lengths = read_documents(self.groups[group_index], self.split, self.vocab_size)
        rng = np.random.default_rng([self.seed, epoch, group_index])
        spans = list(pair_spans(lengths, self.seq_len - 3, self.nsp, rng))
        self._consumed = [a[1] + size for a, _, _, size in spans]
        if self._consumed:
            self._consumed[-1] += int(values.size) - sum(self._consumed)    # tails too short to make a pair
        return [self._encode(values, a, b, label) for a, b, label, _ in spans]

    def _encode(self, values: np.ndarray, a: tuple[int, int], b: tuple[int, int],
                label: int) -> tuple[np.ndarray, np.ndarray, int]:
        first, second = values[a[0]: a[0] + a[1]], values[b[0]: b[0] + b[1]]
        ids = np.full(self.seq_len, self.ids.pad, dtype=np.int64)
        body = np.concatenate([[self.ids.cls], first, [self.ids.sep], second, [self.ids.sep]])
        ids[: len(body)] = body
        segments = np.zeros(self.seq_len, dtype=np.int64)
        segments[len(first) + 2: len(body)] = 1
        return ids, segments, label

    def take(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The next (input ids, segment ids, next-sentence label)."""
        return self.take_counted()[0]

    def take_counted(self) -> tuple[tuple[np.ndarray, np.ndarray, int], int]:
        """The next example, and the document tokens passed over to make it."""
        examples = self._items_left()
        example, consumed = examples[self.state.offset], self._consumed[self.state.offset]
        self.state.offset += 1
        return example, consumed


def pair_spans(lengths: np.ndarray, content: int, nsp: bool,
               rng: np.random.Generator) -> Iterator[tuple[tuple[int, int], tuple[int, int], int, int]]:
    """(A start, length), (B start, length), label, and the length of B's own span, for every chunk of every document.

    With NSP, B may be another document's span; the chunk's own second part is still what was read.
    """
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
    docs = [int(i) for i in np.flatnonzero(lengths > 0)]
    for doc in docs:
        start, length = int(starts[doc]), int(lengths[doc])
        for chunk in range(start, start + length, content):
            size = min(content, start + length - chunk)
            if size < 2:
                continue
            cut = int(rng.integers(1, size))
            a, b = (chunk, cut), (chunk + cut, size - cut)
            if nsp and len(docs) > 1 and rng.random() < 0.5:
                yield a, _random_span(starts, lengths, docs, doc, size - cut, rng), NOT_NEXT, b[1]
            else:
                yield a, b, IS_NEXT, b[1]


def _random_span(starts: np.ndarray, lengths: np.ndarray, docs: list[int], exclude: int, size: int,
                 rng: np.random.Generator) -> tuple[int, int]:
    """A span of up to `size` tokens from a random document other than `exclude`."""
    pick = int(rng.integers(len(docs) - 1))
    other = docs[pick + (pick >= docs.index(exclude))]
    size = min(size, int(lengths[other]))
    offset = int(rng.integers(0, int(lengths[other]) - size + 1))
    return int(starts[other]) + offset, size


def gpt_batches(stream: TokenStream, micro_batch: int, seq_len: int) -> Iterator[Batch]:
    """Windows of seq_len + 1 tokens: inputs are the first seq_len, targets the last seq_len."""
    while True:
        window = stream.take(micro_batch * (seq_len + 1)).reshape(micro_batch, seq_len + 1)
        separators = int(np.count_nonzero(window == stream.eot_id))     # documents never hold the EOT id
        yield Batch({"idx": window[:, :-1], "targets": window[:, 1:]}, stream.state.as_dict(),
                    micro_batch * seq_len, consumed=window.size - separators)


def bert_batches(stream: PairStream, micro_batch: int) -> Iterator[Batch]:
    """Stacked pairs; `attention_mask` marks real tokens, or is None when nothing in the batch is padding."""
    while True:
        counted = [stream.take_counted() for _ in range(micro_batch)]
        examples = [example for example, _ in counted]
        input_ids = np.stack([e[0] for e in examples])
        real = input_ids != stream.ids.pad
        arrays = {"input_ids": input_ids, "segment_ids": np.stack([e[1] for e in examples]),
                  "nsp_labels": np.array([e[2] for e in examples], dtype=np.int64),
                  "attention_mask": None if real.all() else real}
        yield Batch(arrays, stream.state.as_dict(), int(real.sum()), consumed=sum(n for _, n in counted))


def strided(batches: Iterator[Batch], rank: int, world: int) -> Iterator[Batch]:
    """Every `world`-th batch starting at `rank`: how ranks share one validation stream."""
    for index, batch in enumerate(batches):
        if index % world == rank:
            yield batch
