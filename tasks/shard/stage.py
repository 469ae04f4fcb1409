"""The shard stage's work: encode documents with tiktoken into Parquet token shards that pretraining streams.

One row per document (`doc_id, source, split, tokens`), zstd, row groups of at most
`row_group_rows` rows or 4 MiB of tokens, a new shard file past `target_shard_bytes` of tokens.
Documents are encoded with `encode_ordinary` semantics: text that spells a special token stays text.
The tokens do not end with an end-of-text token; the pretrain loader inserts separators.
With `mixture`, the training rows are then re-weighted by source (`tasks.shard.mixture`).
"""
from __future__ import annotations

import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken

from storage import progress
from storage.documents import count_documents
from storage.formats import Mixture, ShardEntry, ShardManifest, SplitTokens
from storage.sampling import unit_hash
from storage.stage import StageContext, StageError, StageResult
from tasks.shard import mixture as mix
from tasks.shard.config import ShardConfig
from tasks.tokenizer.files import read_vocabulary
from tasks.tokenizer.corpus import check_sources_exist, read_rows, readable_document_files

SHARD_DIR = "shards"
MANIFEST_FILE = "manifest.json"
EOT_TOKEN = "<|endoftext|>"
ROW_GROUP_MAX_BYTES = 4 * 2**20
BATCH_MAX_CHARS = 2**20      # text per encoding task; a few tasks are in flight at once
SPLIT_SALT = "shard-split"
SPLIT_RULE = (f"val if storage.sampling.unit_hash({SPLIT_SALT!r}, doc_id) < val_fraction, where unit_hash(salt, key) "
              "= int.from_bytes(sha256(salt.encode() + b'\\0' + key.encode()).digest()[:8], 'big') / 2**64")


def split_of(doc_id: str, val_fraction: float) -> str:
    """"val" or "train" by a salted hash of the document id: re-sharding never moves a document, and the
    split is independent of every sample taken upstream (each has its own salt)."""
    return "val" if unit_hash(SPLIT_SALT, doc_id) < val_fraction else "train"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65_535 else "uint32"


def shard_schema(dtype: str) -> pa.Schema:
    return pa.schema([
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("tokens", pa.list_(pa.from_numpy_dtype(np.dtype(dtype))), nullable=False),
    ])


# --- encoding -------------------------------------------------------------------------------------

def encode_text(encoding: tiktoken.Encoding, text: str) -> np.ndarray:
    """`encode_ordinary(text)` as a uint32 array: no special token is allowed, so none is produced."""
    try:
        return encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except UnicodeEncodeError:   # lone surrogates become U+FFFD, as encode_ordinary does
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())


def _encode_batch(encoding: tiktoken.Encoding, texts: list[str]) -> list[np.ndarray]:
    return [encode_text(encoding, text) for text in texts]


Row = tuple[str, str, str]   # (doc_id, source, text)


def _batched(docs: Iterable[Row], size: int) -> Iterator[list[Row]]:
    """Batches of `size` documents, cut early at BATCH_MAX_CHARS so long documents keep memory bounded."""
    batch: list[Row] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[2])
        if len(batch) >= size or chars >= BATCH_MAX_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encoded_batches(encoding: tiktoken.Encoding, docs: Iterable[Row], batch_size: int,
                    workers: int) -> Iterator[tuple[list[Row], list[np.ndarray]]]:
    """(documents, token arrays) in input order, encoded on `workers` threads a few batches ahead.

    tiktoken releases the GIL while encoding; whole batches per task keep the pool's overhead low,
    and the bounded look-ahead keeps memory flat.
    """
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for batch in _batched(docs, batch_size):
            pending.append((batch, pool.submit(_encode_batch, encoding, [text for _, _, text in batch])))
            if len(pending) > 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


# --- writing --------------------------------------------------------------------------------------

@dataclass
class ShardStats:
    """Counts for one shard file, as the manifest lists them."""

    path: str
    rows: int = 0
    tokens: int = 0
    tokens_train: int = 0
    tokens_val: int = 0

    def add(self, split: str, n_tokens: int) -> None:
        self.rows += 1
        self.tokens += n_tokens
        if split == "val":
            self.tokens_val += n_tokens
        else:
            self.tokens_train += n_tokens


@dataclass
class ShardWriter:
    """Rolls rows into `shards/shard-00000.parquet`, ...; boundaries depend only on the rows."""

    directory: Path
    dtype: str
    row_group_rows: int
    target_shard_bytes: int
    compression: str = "zstd"
    shards: list[ShardStats] = field(default_factory=list)
    _rows: list[tuple[str, str, str, np.ndarray]] = field(default_factory=list)
    _buffered_bytes: int = 0
    _shard_bytes: int = 0
    _writer: pq.ParquetWriter | None = None

    def add(self, doc_id: str, source: str, split: str, tokens: np.ndarray) -> None:
        self._rows.append((doc_id, source, split, tokens))
        self._buffered_bytes += tokens.size * np.dtype(self.dtype).itemsize
        if len(self._rows) >= self.row_group_rows or self._buffered_bytes >= ROW_GROUP_MAX_BYTES:
            self._write_row_group()

    def close(self) -> list[ShardStats]:
        self._write_row_group()
        self._close_shard()
        return self.shards

    def _write_row_group(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            self._open_shard()
        for _, _, split, tokens in self._rows:
            self.shards[-1].add(split, int(tokens.size))
        self._writer.write_table(self._table(), row_group_size=len(self._rows))
        self._shard_bytes += self._buffered_bytes
        self._rows, self._buffered_bytes = [], 0
        if self._shard_bytes >= self.target_shard_bytes:
            self._close_shard()

    def _table(self) -> pa.Table:
        doc_ids, sources, splits, arrays = zip(*self._rows)
        offsets = np.cumsum([0, *(a.size for a in arrays)], dtype=np.int32)
        values = pa.array(np.concatenate(arrays, dtype=self.dtype, casting="same_kind"))
        schema = shard_schema(self.dtype)
        tokens = pa.ListArray.from_arrays(pa.array(offsets), values, type=schema.field("tokens").type)
        return pa.Table.from_arrays([pa.array(doc_ids, pa.string()), pa.array(sources, pa.string()),
                                     pa.array(splits, pa.string()), tokens], schema=schema)

    def _open_shard(self) -> None:
        relative = f"{SHARD_DIR}/shard-{len(self.shards):05d}.parquet"
        self.shards.append(ShardStats(relative))
        path = self.directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(path, shard_schema(self.dtype), compression=self.compression,
                                        use_dictionary=["source", "split"])
        self._shard_bytes = 0

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# --- the stage ------------------------------------------------------------------------------------

def cap_tokens(tokens: np.ndarray, config: ShardConfig, result: StageResult) -> list[np.ndarray]:
    """The rows for one document's tokens: split or truncated at `max_tokens_per_doc` (counted)."""
    cap = config.max_tokens_per_doc
    if cap is None or tokens.size <= cap:
        return [tokens]
    if config.overlong == "truncate":
        result.count("docs_truncated")
        result.count("tokens_truncated", tokens.size - cap)
        return [tokens[:cap]]
    result.count("docs_split")
    return [tokens[start:start + cap] for start in range(0, tokens.size, cap)]


def shard_documents(batches: Iterable[tuple[list[Row], list[np.ndarray]]], writer: ShardWriter,
                    config: ShardConfig, result: StageResult) -> dict[str, dict[str, int]]:
    """Writes every non-empty document's rows; returns tokens by source and split."""
    by_source: dict[str, dict[str, int]] = {}
    for doc_id, source, split, tokens in split_documents(batches, config, result):
        write_document(writer, (doc_id, source, split), tokens, config, result, by_source)
    return by_source


def split_documents(batches: Iterable[tuple[list[Row], list[np.ndarray]]], config: ShardConfig,
                    result: StageResult) -> Iterator[tuple[str, str, str, np.ndarray]]:
    """(doc id, source, split, tokens) of every non-empty document; `docs_in` and empty ones counted."""
    for docs, arrays in batches:
        for (doc_id, source, text), tokens in zip(docs, arrays):
            result.count("docs_in")
            if not text.strip():
                result.count("dropped/shard/empty")
                continue
            yield doc_id, source, split_of(doc_id, config.val_fraction), tokens


def write_document(writer: ShardWriter, row: tuple[str, str, str], tokens: np.ndarray, config: ShardConfig,
                   result: StageResult, by_source: dict[str, dict[str, int]], repeat: int = 0) -> None:
    """The rows of one document, or of its `repeat`-th copy (ids `<row id>@<repeat>`); counted."""
    doc_id, source, split = row
    rows = cap_tokens(tokens, config, result if repeat == 0 else StageResult())   # a copy's cut is counted once
    for part, row_tokens in enumerate(rows):
        row_id = doc_id if len(rows) == 1 else f"{doc_id}#{part}"
        writer.add(row_id if repeat == 0 else f"{row_id}@{repeat}", source, split, row_tokens)
        counts = by_source.setdefault(source, {"train": 0, "val": 0})
        counts[split] += int(row_tokens.size)
    if repeat == 0:
        result.count("docs_out")
        result.count(f"docs_{split}")
    else:
        result.count("rows_repeated", len(rows))
    result.count("rows_out", len(rows))


def _input(ctx: StageContext, name: str) -> Path:
    if name not in ctx.inputs:
        raise StageError(f"shard: the upstream input {name!r} is missing (inputs: {sorted(ctx.inputs)})")
    return Path(ctx.inputs[name])


def run(config: ShardConfig, ctx: StageContext) -> StageResult:
    """Encodes `ctx.inputs["documents"]` with `ctx.inputs["tokenizer"]` into `ctx.output`."""
    result = StageResult()
    tokenizer_dir = _input(ctx, "tokenizer")
    vocab = read_vocabulary(tokenizer_dir)
    encoding = vocab.encoding(f"lmforge:{tokenizer_dir.name}")
    files = readable_document_files(_input(ctx, "documents"))
    if config.mixture is not None:
        check_sources_exist("shard.mixture", config.mixture, files)     # before hours of encoding
    dtype = token_dtype(vocab.vocab_size)
    writer = ShardWriter(Path(ctx.output), dtype, config.row_group_rows, config.target_shard_bytes)
    workers = config.workers or os.cpu_count() or 1
    batches = progress.counting(encoded_batches(encoding, read_rows(files, ["id", "source", "text"]), config.batch_size,
                                                workers), ctx.scratch, "doc", total=count_documents(files),
                                size=lambda batch: len(batch[0]))
    if config.mixture is None:
        by_source, mixture = shard_documents(batches, writer, config, result), None
    else:
        by_source, mixture = shard_mixture(batches, writer, config, ctx, result)
    shards = writer.close()
    build_manifest(config, vocab.special_tokens, vocab.vocab_size, dtype, shards, by_source, mixture).write(
        Path(ctx.output) / MANIFEST_FILE)
    _count_totals(result, shards, by_source, vocab.vocab_size)
    return result


def shard_mixture(batches: Iterable[tuple[list[Row], list[np.ndarray]]], writer: ShardWriter, config: ShardConfig,
                  ctx: StageContext, result: StageResult) -> tuple[dict[str, dict[str, int]], Mixture]:
    """Encodes into unmixed shards in scratch, then writes the mixture from them into `writer`."""
    unmixed = ShardWriter(mix.clean(Path(ctx.scratch) / mix.UNMIXED_DIR), writer.dtype, config.row_group_rows,
                          config.target_shard_bytes, compression=mix.UNMIXED_COMPRESSION)
    available: dict[str, int] = {}
    for doc_id, source, split, tokens in split_documents(batches, config, result):
        unmixed.add(doc_id, source, split, tokens)         # whole documents: the cut is made when writing
        available[source] = available.get(source, 0) + (capped_size(tokens.size, config) if split == "train" else 0)
    files = [unmixed.directory / shard.path for shard in unmixed.close()]
    plans = mix.plan_mixture(config, available)
    by_source = write_mixture(files, plans, mix.mixture_salt(ctx.seed), writer, config, result)
    shutil.rmtree(unmixed.directory)
    record = mix.mixture_record(plans, by_source, ctx.seed, mix.target_tokens(config, available))
    mix.count_mixture(result, record)
    return by_source, record


def capped_size(n_tokens: int, config: ShardConfig) -> int:
    """The tokens a document of `n_tokens` has in the shards (fewer only when truncated)."""
    cap = config.max_tokens_per_doc
    return min(n_tokens, cap) if cap is not None and config.overlong == "truncate" else n_tokens


def write_mixture(files: list[Path], plans: dict[str, mix.SourcePlan], salt: str, writer: ShardWriter,
                  config: ShardConfig, result: StageResult) -> dict[str, dict[str, int]]:
    """Round 0: every row written at all (a training row the mixture leaves out is counted); round k: k-th copies."""
    by_source: dict[str, dict[str, int]] = {}
    for k, rows, copies in mix.rounds(files, plans, salt):
        for index, count in enumerate(copies):
            row = (rows.doc_ids[index], rows.sources[index], rows.splits[index])
            if count > k:
                write_document(writer, row, rows.tokens(index), config, result, by_source, repeat=k)
            elif k == 0:
                result.count(mix.drop_reason(plans[row[1]]))
    return by_source


def build_manifest(config: ShardConfig, special_tokens: dict[str, int], vocab_size: int, dtype: str,
                   shards: list[ShardStats], by_source: dict[str, dict[str, int]],
                   mixture: Mixture | None = None) -> ShardManifest:
    """What the pretrain loader reads: token layout, the split rule, and counts per shard and source."""
    return ShardManifest(
        vocab_size=vocab_size,
        token_dtype=dtype,
        eot_token=EOT_TOKEN if EOT_TOKEN in special_tokens else None,
        eot_id=special_tokens.get(EOT_TOKEN),
        eot_appended=False,
        special_tokens=special_tokens,
        val_fraction=config.val_fraction,
        split_rule=SPLIT_RULE,
        max_tokens_per_doc=config.max_tokens_per_doc,
        overlong=config.overlong,
        split_doc_id_format="<doc_id>#<part>",
        shards=[ShardEntry(**asdict(shard)) for shard in shards],
        tokens_by_source={source: SplitTokens(**by_source[source]) for source in sorted(by_source)},
        total_tokens=sum(shard.tokens for shard in shards),
        mixture=mixture,
    )


def _count_totals(result: StageResult, shards: list[ShardStats], by_source: dict[str, dict[str, int]],
                  vocab_size: int) -> None:
    result.count("tokens_total", sum(shard.tokens for shard in shards))
    result.count("tokens_train", sum(shard.tokens_train for shard in shards))
    result.count("tokens_val", sum(shard.tokens_val for shard in shards))
    result.count("shards", len(shards))
    result.count("vocab_size", vocab_size)
    for source in sorted(by_source):
        result.count(f"tokens_by_source/{source}", sum(by_source[source].values()))
    for name in ("docs_in", "docs_out", "dropped/shard/empty"):
        result.count(name, 0)    # present even when zero, so the funnel always adds up
