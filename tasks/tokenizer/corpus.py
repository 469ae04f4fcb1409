"""Which documents the tokenizer trains on, and which it keeps out to measure compression."""
from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.documents import count_documents, document_files
from storage.sampling import unit_hash
from storage.stage import StageError

from .config import TokenizerConfig

HELDOUT_MAX_SHARE = 10   # never hold out more than one document in ten
HELDOUT_SALT = "tokenizer-heldout"
TRAIN_SALT = "tokenizer-train"


def select_heldout(files: list[Path], wanted: int) -> set[str]:
    """The ids of the `wanted` documents with the smallest hash (at most a tenth of the corpus).

    Streams only the `id` column and keeps `wanted` ids; the choice does not depend on file order.
    """
    wanted = min(wanted, count_documents(files) // HELDOUT_MAX_SHARE)
    largest_first: list[tuple[float, str]] = []   # a max-heap of the smallest hashes seen so far
    for path in files if wanted else []:
        row = 0
        for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(columns=["id"], batch_size=65_536):
            check_no_nulls(path, batch, row)
            row += batch.num_rows
            for doc_id in batch.column(0).to_pylist():
                item = (-unit_hash(HELDOUT_SALT, doc_id), doc_id)
                if len(largest_first) < wanted:
                    heapq.heappush(largest_first, item)
                elif item > largest_first[0]:
                    heapq.heapreplace(largest_first, item)
    return {doc_id for _, doc_id in largest_first}


def readable_document_files(directory: Path) -> list[Path]:
    """The document Parquet files under `directory`, each footer checked (a broken file is named)."""
    files = document_files(directory)
    for path in files:
        try:
            pq.ParquetFile(path).close()
        except (pa.ArrowException, OSError) as exc:
            raise StageError(f"{path}: not a readable Parquet file ({exc})") from None
    return files


def read_rows(files: list[Path], columns: list[str]) -> Iterator[tuple]:
    """The values of `columns` for each document, a row group at a time; an unreadable file is named.

    Plain tuples rather than `Document`s: these stages read millions of rows and need no metadata.
    """
    for path in files:
        try:
            # pre_buffer=False: pyarrow's default reads the whole file's columns up front (memory
            # would grow with the file); one decoding thread: the encoders use the cores, and
            # Arrow's per-thread allocator caches would hold on to ~100 MB.
            parquet = pq.ParquetFile(path, pre_buffer=False)
            row = 0
            for batch in parquet.iter_batches(batch_size=1024, columns=columns, use_threads=False):
                check_no_nulls(path, batch, row)
                yield from zip(*(batch.column(name).to_pylist() for name in columns))
                row += batch.num_rows
        except (pa.ArrowException, KeyError, ValueError) as exc:
            raise StageError(f"{path}: cannot read it as document Parquet ({type(exc).__name__}: {exc})") from None


def check_no_nulls(path: Path, batch: pa.RecordBatch, first_row: int) -> None:
    """A null id, source or text is named by file, row (and id), not met later as a TypeError."""
    for name in batch.schema.names:
        column = batch.column(name)
        if column.null_count:
            index = column.is_null().to_numpy(zero_copy_only=False).argmax()
            ids = batch.column("id") if "id" in batch.schema.names else None
            which = f" (id {ids[index].as_py()!r})" if ids is not None and ids[index].is_valid else ""
            raise StageError(f"{path}: row {first_row + int(index)}{which}: field {name!r} is null; "
                             "every document has an id, a source and a text")


def document_sources(files: list[Path]) -> set[str]:
    """The source names of the documents, from their `source` column alone (cheap: checked before training or encoding)."""
    sources: set[str] = set()
    for path in files:
        try:
            table = pq.read_table(path, columns=["source"])
        except (pa.ArrowException, KeyError) as exc:
            raise StageError(f"{path}: cannot read the 'source' column of document Parquet "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        row = 0
        for batch in table.to_batches():
            check_no_nulls(path, batch, row)
            row += batch.num_rows
        sources.update(pc.unique(table["source"]).to_pylist())
    return sources


def check_sources_exist(field: str, wanted: Iterable[str], files: list[Path]) -> None:
    """Fails naming the entries of `field` that no document has as its source (a typo), and the sources there are."""
    existing = document_sources(files)
    unknown = [source for source in wanted if source not in existing]
    if unknown:
        raise StageError(f"{field} names {', '.join(map(repr, unknown))}, which no document has; "
                         f"the documents' sources are: {', '.join(sorted(existing)) or '(none)'}")


class TrainingCorpus:
    """One pass over the documents: training text first, then the held-out documents it passed by.

    `texts()` yields training text (each document cut at `max_doc_chars`, all of it at
    `max_train_chars`) and sets the held-out documents aside; `heldout_texts()` then reads on only
    as far as needed to collect the remaining held-out documents.
    """

    def __init__(self, files: list[Path], config: TokenizerConfig, heldout_ids: set[str]) -> None:
        self.config = config
        self.heldout_ids = heldout_ids
        self.train_chars = 0
        self.train_docs = 0
        self._rows: Iterator[tuple[str, str, str]] = read_rows(files, ["id", "source", "text"])
        self._heldout: list[str] = []

    def _trainable(self, doc_id: str, source: str) -> bool:
        if self.config.sources is not None and source not in self.config.sources:
            return False
        return self.config.train_fraction >= 1 or unit_hash(TRAIN_SALT, doc_id) < self.config.train_fraction

    def _set_aside(self, doc_id: str, text: str) -> bool:
        if doc_id in self.heldout_ids:
            self._heldout.append(text[: self.config.max_doc_chars])
            return True
        return False

    def texts(self) -> Iterator[str]:
        for doc_id, source, text in self._rows:
            if self._set_aside(doc_id, text) or not text or not self._trainable(doc_id, source):
                continue
            text = text[: min(self.config.max_doc_chars, self.config.max_train_chars - self.train_chars)]
            self.train_chars += len(text)
            self.train_docs += 1
            yield text
            if self.train_chars >= self.config.max_train_chars:
                return

    def heldout_texts(self) -> list[str]:
        for doc_id, _, text in self._rows:
            if len(self._heldout) >= len(self.heldout_ids):
                break
            self._set_aside(doc_id, text)
        return self._heldout
