"""The datatrove steps lmforge adds around datatrove's own: our Parquet reader/writer, funnel counters.

- `DocumentReader` reads the document Parquet format, sharded by row group (not by file: ingest
  writes few large files, and a rank per file would leave most workers idle).
- `DocumentParquetWriter` writes exactly `storage.documents.DOCUMENT_SCHEMA`.
- `FunnelFilter` / `FunnelStep` wrap a datatrove step and count documents in and out per source;
  a document that makes a filter raise is dropped as `error` and listed, not fatal to its rank.
- `ReasonedDrops` gives a datatrove step that counts its drops only as `dropped` (the dedup filters)
  the reason that is its only one, counted at the drop itself.
- `HashSampler` keeps a seeded, order-independent fraction of the documents.

Everything here is pickled to worker processes (forkserver, Slurm, Ray): plain classes, no lambdas.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq
from datatrove.data import Document as DtDocument
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers.base import BaseReader
from datatrove.pipeline.writers.parquet import ParquetWriter
from datatrove.utils.logging import logger
from datatrove.utils.typeshelper import StatHints

from storage.documents import DOCUMENT_SCHEMA, ROW_GROUP_ROWS, TARGET_FILE_BYTES, document_files
from storage.sampling import keep

# Keys of datatrove's metadata dict that are columns of our schema (or reader bookkeeping), not metadata.
COLUMN_KEYS = ("source", "url")
PLAN_FILE = "plan.json"
MAX_PROBLEMS_PER_STEP = 50   # per rank: enough to diagnose, never a log the size of the data
REQUIRED_COLUMNS = ("id", "text", "source")


# --- the read plan --------------------------------------------------------------------------------

def plan_units(input_dir: Path) -> tuple[list[list[Any]], list[dict[str, str]]]:
    """Every (file, row group, rows) of the input, and the files whose footer or schema is unreadable."""
    units: list[list[Any]] = []
    bad: list[dict[str, str]] = []
    for path in document_files(input_dir):
        relative = str(path.relative_to(input_dir))
        try:
            meta = pq.ParquetFile(path).metadata
            names = set(meta.schema.to_arrow_schema().names)
        except Exception as err:  # pyarrow raises several types for a damaged footer
            bad.append({"path": str(path), "reason": "corrupt_parquet", "detail": f"{type(err).__name__}: {err}"})
            continue
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            bad.append({"path": str(path), "reason": "not_document_parquet", "detail": f"missing columns {missing}"})
            continue
        units.extend([relative, rg, meta.row_group(rg).num_rows] for rg in range(meta.num_row_groups))
    return units, bad


def write_plan(scratch: Path, input_dir: Path) -> tuple[Path, list[dict[str, str]]]:
    """The read plan in `scratch/plan.json`, kept from an earlier attempt so ranks see the same units."""
    plan_path = scratch / PLAN_FILE
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        return plan_path, plan["bad"]
    units, bad = plan_units(input_dir)
    tmp = plan_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"input_dir": str(input_dir), "units": units, "bad": bad}))
    tmp.replace(plan_path)
    return plan_path, bad


# --- problems found inside ranks ------------------------------------------------------------------

class ProblemLog:
    """Writes bad-input records of one rank and step to `<folder>/<rank>-<step>.jsonl`, up to a cap.

    A rank's first record in this process starts its file afresh: a rank run again (a rerun after a
    crash, or datatrove's retry of a lost Ray worker) must not list its problems twice.
    """

    def __init__(self, folder: str, step: str) -> None:
        self.folder = folder
        self.step = step
        self.written = 0
        self.started_ranks: set[int] = set()

    def add(self, rank: int, path: str, reason: str, detail: str, where: str | None = None) -> None:
        if self.written >= MAX_PROBLEMS_PER_STEP:
            return
        self.written += 1
        record = {"path": path, "reason": reason, "detail": detail[:500], "where": where, "step": self.step}
        target = Path(self.folder) / f"{rank:05d}-{self.step}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = "a" if rank in self.started_ranks else "w"
        self.started_ranks.add(rank)
        with open(target, mode, encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def read_problems(folder: Path) -> list[dict[str, Any]]:
    """Every record the ranks logged, in rank order."""
    records = []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        records.extend(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line)
    return records


# --- reader and writer ----------------------------------------------------------------------------

def source_key(source: str) -> str:
    """A source name safe inside a stats key (`/` separates the key's parts)."""
    return source.replace("/", "_") or "unknown"


class DocumentReader(BaseReader):
    """Reads its rank's share of the plan's row groups; unusable rows are dropped with a reason.

    Counters: `documents` (rows read, the stage's `docs_in`), `in/<source>`, and `dropped_<reason>`:
    `empty_text`, `bad_metadata` (not a JSON object; listed) and `corrupt` (the rows of a row group
    that could not be decoded; the rows before the damage go on, the file is listed).
    """

    name = "📒 lmforge documents"

    def __init__(self, plan_file: str, problems_dir: str, batch_size: int = 256) -> None:
        super().__init__()
        self.plan_file = plan_file
        self.batch_size = batch_size
        self.problems = ProblemLog(problems_dir, "read")

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        plan = json.loads(Path(self.plan_file).read_text())
        input_dir = Path(plan["input_dir"])
        for relative, row_group, rows in plan["units"][rank::world_size]:
            yield from self._read_unit(input_dir / relative, row_group, rows, rank)

    def _read_unit(self, path: Path, row_group: int, rows: int, rank: int) -> Iterator[DtDocument]:
        read = 0
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=self.batch_size, row_groups=[row_group]):
                for row in batch.to_pylist():
                    read += 1
                    doc = self._to_document(row, path, rank)
                    if doc is not None:
                        yield doc
        except Exception as err:  # pyarrow could not decode a page: count the rows it held
            self._drop("corrupt", value=rows - read)
            self.stat_update("documents", value=rows - read)
            self.problems.add(rank, str(path), "corrupt_parquet", f"{type(err).__name__}: {err}",
                              f"row group {row_group}, after {read} of {rows} rows")

    def _to_document(self, row: dict[str, Any], path: Path, rank: int) -> DtDocument | None:
        self.stat_update("documents", f"in/{source_key(row.get('source') or 'unknown')}")
        text = row.get("text") or ""
        if not text.strip():
            return self._drop("empty_text")
        try:
            metadata = json.loads(row.get("metadata") or "{}")
        except json.JSONDecodeError as err:
            metadata = err
        if not isinstance(metadata, dict):
            self.problems.add(rank, str(path), "bad_metadata", f"not a JSON object: {metadata}", f"id {row['id']}")
            return self._drop("bad_metadata")
        metadata.update(source=row.get("source") or "unknown", url=row.get("url"))
        self.stat_update("forwarded")
        return DtDocument(text=text, id=row["id"], metadata=metadata)

    def _drop(self, reason: str, value: int = 1) -> None:
        self.stat_update("dropped", f"dropped_{reason}", value=value)


def _jsonable(value: Any) -> Any:
    """numpy scalars (from datatrove's filters) as plain numbers."""
    return value.item() if hasattr(value, "item") else str(value)


def to_row(document: DtDocument) -> dict[str, Any]:
    """A datatrove document as a row of `DOCUMENT_SCHEMA`."""
    metadata = {k: v for k, v in document.metadata.items() if k not in COLUMN_KEYS and k != "file_path"}
    return {"id": document.id, "text": document.text, "source": document.metadata.get("source") or "unknown",
            "url": document.metadata.get("url"),
            "metadata": json.dumps(metadata, ensure_ascii=False, sort_keys=True, default=_jsonable)}


class DocumentParquetWriter(ParquetWriter):
    """datatrove's ParquetWriter producing exactly the document schema (zstd, ~128 MB files)."""

    name = "📒 lmforge documents"

    def __init__(self, output_folder: str, output_filename: str = "part-${rank}.parquet",
                 max_file_size: int = TARGET_FILE_BYTES) -> None:
        super().__init__(output_folder, output_filename, compression="zstd", batch_size=ROW_GROUP_ROWS,
                         max_file_size=max_file_size, schema=DOCUMENT_SCHEMA)

    def _default_adapter(self, document: DtDocument) -> dict[str, Any]:
        return to_row(document)

    def write(self, document: DtDocument, rank: int = 0, **kwargs: Any) -> None:
        super().write(document, rank, **kwargs)
        self.stat_update(f"out/{source_key(document.metadata.get('source') or 'unknown')}")


def excluded_writer(folder: str) -> DocumentParquetWriter:
    """A writer for one filter's removed documents; the leading `_` keeps them out of `document_files()`."""
    return DocumentParquetWriter(folder, "_excluded-${rank}.parquet", max_file_size=-1)


# --- funnel counters ------------------------------------------------------------------------------

def _counted(step: PipelineStep, data: DocumentsPipeline, direction: str) -> DocumentsPipeline:
    for doc in data:
        source = source_key(doc.metadata.get('source') or 'unknown')
        step.stat_update(f"{direction}/{source}")
        # bytes too: a step that drops few but long documents (or shortens them) shows in the funnel
        step.stat_update(f"bytes_{direction}/{source}", value=len(doc.text.encode("utf-8", "replace")))
        yield doc


class FunnelStep(PipelineStep):
    """Runs `inner` and counts documents in and out per source into the inner step's own stats.

    The wrapper shares `inner.stats`, so the stats file holds datatrove's counters and ours together.
    """

    def __init__(self, label: str, inner: PipelineStep) -> None:
        super().__init__()
        self.label = label
        self.inner = inner
        self.name, self.type = inner.name, inner.type
        self.stats = inner.stats

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        inner_out = self.inner.run(_counted(self, data, "in"), rank, world_size)
        yield from _counted(self, inner_out, "out")


class FunnelFilter(BaseFilter):
    """A datatrove filter with per-source funnel counters; a document that makes it raise is dropped.

    The inner filter's verdicts and reasons (`dropped_<reason>`) land in its own stats, as in datatrove.
    A bare `False` (no reason) is dropped as `reason` when the wrapper is given the filter's only
    reason; otherwise it stays unexplained and the stage fails naming the step (see `funnel.stage_stats`).
    """

    def __init__(self, label: str, inner: BaseFilter, problems_dir: str, reason: str | None = None) -> None:
        super().__init__(exclusion_writer=inner.exclusion_writer)
        self.label = label
        self.inner = inner
        self.reason = reason
        self.name, self.type = inner.name, inner.type
        self.stats = inner.stats
        self.problems = ProblemLog(problems_dir, label)
        self._rank = 0

    def filter(self, doc: DtDocument) -> bool | tuple[bool, str]:
        try:
            verdict = self.inner.filter(doc)
        except ImportError:
            raise  # a missing package is the installation's fault, not this document's
        except Exception as err:  # one bad document must not fail the rank
            logger.warning(f"{self.label}: {type(err).__name__} on document {doc.id}: {err}")
            self.problems.add(self._rank, doc.id, f"{self.label}_error", f"{type(err).__name__}: {err}")
            return False, "error"
        if verdict is False and self.reason:
            return False, self.reason
        return verdict

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._rank = rank
        yield from _counted(self, super().run(_counted(self, data, "in"), rank, world_size), "out")


class ReasonedDrops:
    """Mixin for a datatrove step that drops documents counting only `dropped`: each such drop is
    also counted as `dropped_<drop_reason>` (the step's only reason), at the moment it happens.

    A step that loses documents without even counting `dropped` stays unexplained, and fails the stage.
    """

    drop_reason: ClassVar[str]

    def stat_update(self, *labels: str, value: int = 1, unit: str | None = None) -> None:
        if StatHints.dropped in labels:
            labels = (*labels, f"dropped_{self.drop_reason}")
        super().stat_update(*labels, value=value, unit=unit)  # type: ignore[misc]


def sample_salt(seed: int) -> str:
    """Curate's own salt: it samples independently of ingest's sample (salt `ingest-sample:<seed>`)."""
    return f"curate-sample:{seed}"


class HashSampler(BaseFilter):
    """Keeps a document when a seeded hash of its id falls under `rate`: the same documents whatever the order."""

    name = "🎲 Sampler"

    def __init__(self, rate: float, seed: int, exclusion_writer: Any = None) -> None:
        super().__init__(exclusion_writer)
        self.rate = rate
        self.seed = seed

    def filter(self, doc: DtDocument) -> bool | tuple[bool, str]:
        return keep(sample_salt(self.seed), doc.id, self.rate) or (False, "not_sampled")
