"""The document Parquet format: schema, a streaming writer that rolls files, a streaming reader."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=True),
        pa.field("metadata", pa.string(), nullable=False),  # a JSON object as text
    ]
)
TARGET_FILE_BYTES = 128 * 1024 * 1024
ROW_GROUP_ROWS = 2048


@dataclass
class Document:
    """One document as the pipeline passes it on."""

    id: str
    text: str
    source: str
    url: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "source": self.source,
            "url": self.url,
            "metadata": json.dumps(self.metadata, ensure_ascii=False, sort_keys=True),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Document":
        return cls(row["id"], row["text"], row["source"], row.get("url"), json.loads(row["metadata"] or "{}"))


class DocumentWriter:
    """Streams documents into `<dir>/<prefix>-00000.parquet`, starting a new file past `target_bytes`.

    Sizes are counted on the uncompressed text, so files land at or under the target once compressed.
    """

    def __init__(self, directory: Path, prefix: str = "part", target_bytes: int = TARGET_FILE_BYTES,
                 row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.target_bytes = target_bytes
        self.row_group_rows = row_group_rows
        self.files: list[Path] = []
        self.rows_written = 0
        self._writer: pq.ParquetWriter | None = None
        self._buffer: list[dict[str, Any]] = []
        self._file_bytes = 0

    def write(self, doc: Document) -> None:
        if self._writer is None:
            self._open_next_file()
        self._buffer.append(doc.to_row())
        self._file_bytes += len(doc.text.encode("utf-8", "surrogatepass"))
        self.rows_written += 1
        if len(self._buffer) >= self.row_group_rows:
            self._flush()
        if self._file_bytes >= self.target_bytes:
            self._close_file()

    def write_all(self, docs: Iterable[Document]) -> None:
        for doc in docs:
            self.write(doc)

    def close(self) -> list[Path]:
        """Finish the open file; returns every file written."""
        self._close_file()
        return self.files

    def __enter__(self) -> "DocumentWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_next_file(self) -> None:
        path = self.directory / f"{self.prefix}-{len(self.files):05d}.parquet"
        self._writer = pq.ParquetWriter(path, DOCUMENT_SCHEMA, compression="zstd")
        self.files.append(path)
        self._file_bytes = 0

    def _flush(self) -> None:
        if self._buffer and self._writer is not None:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=DOCUMENT_SCHEMA))
            self._buffer = []

    def _close_file(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def document_files(directory: Path) -> list[Path]:
    """The document Parquet files of a stage output, in a stable order (temp files ignored: a `.tmp-` inside the
    output, not in the folders above it, where the user keeps the workspace)."""
    directory = Path(directory)
    return sorted(p for p in directory.rglob("*.parquet")
                  if ".tmp-" not in str(p.relative_to(directory)) and not p.name.startswith("_"))


def iter_documents(paths: Path | Iterable[Path], columns: list[str] | None = None) -> Iterator[Document]:
    """Streams documents from a directory or a list of Parquet files, one row group at a time."""
    files = document_files(paths) if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    for path in files:
        # pre_buffer=False: read one row group at a time instead of the whole file's columns up front.
        parquet = pq.ParquetFile(path, pre_buffer=False)
        for batch in parquet.iter_batches(batch_size=1024, columns=columns, use_threads=False):
            for row in batch.to_pylist():
                row.setdefault("url", None)
                row.setdefault("metadata", "{}")
                yield Document.from_row(row)


def count_documents(paths: Path | Iterable[Path]) -> int:
    """Row count from Parquet footers, without reading any text."""
    files = document_files(paths) if isinstance(paths, (str, Path)) else list(paths)
    return sum(pq.ParquetFile(p).metadata.num_rows for p in files)
