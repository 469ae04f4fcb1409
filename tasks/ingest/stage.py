"""The ingest stage's work: stream every source of the recipe into the document Parquet format.

Stats: `docs_in` counts every record that could have become a document, `docs_out` the documents
written, and each other record lands in `dropped/ingest/<reason>`. Problems are also counted per
file, `bad/<source>/<file>/<reason>`, and listed in `_SUCCESS.json` (`bad_inputs`).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from storage import progress
from storage.documents import Document, DocumentWriter
from storage.sampling import keep
from storage.stage import StageContext, StageError, StageResult
from tasks.ingest import hub
from tasks.ingest.config import FileSource, HfSource, IngestConfig, SourceBase, WikiOfflineSource, resolve_paths
from tasks.ingest.readers import Rejected, read_hf, read_source_file, read_wiki_offline


def sample_salt(seed: int) -> str:
    """Ingest's own salt: a later sample (curate's) draws independently of this one."""
    return f"ingest-sample:{seed}"


def keep_sampled(doc_id: str, rate: float, seed: int) -> bool:
    """A seeded coin per document id: the same documents are kept whatever the reading order."""
    return keep(sample_salt(seed), doc_id, rate)


def run(config: IngestConfig, ctx: StageContext) -> StageResult:
    result = StageResult()
    for source in config.sources:
        with DocumentWriter(ctx.output / source.name, prefix="part") as writer:
            written = _ingest_source(source, ctx.seed, writer, result, ctx.scratch)
        result.count(f"by_source/{source.name}/docs_out", written)
        if written == 0:
            raise StageError(f"source {source.name!r} yielded no documents" + _problems_note(source, result))
    return result


def _problems_note(source: SourceBase, result: StageResult, examples: int = 3) -> str:
    """` (problems: ...)`: the source's problems by reason, each with its first file, place and detail."""
    first: dict[str, dict] = {}
    for bad in result.bad_inputs:
        if bad.get("source") == source.name:
            first.setdefault(bad["reason"], bad)
    if not first:
        return ""
    shown = [f"{reason} ({bad['path']}" + (f", {bad['where']}" if bad.get("where") else "")
             + (f": {bad['detail'][:120]}" if bad.get("detail") else "") + ")"
             for reason, bad in sorted(first.items())[:examples]]
    return f" (problems: {'; '.join(shown)}" + ("; ..." if len(first) > examples else "") + ")"


def _ingest_source(source: SourceBase, seed: int, writer: DocumentWriter, result: StageResult,
                   progress_dir: Path) -> int:
    """Streams one source into `writer`, applying its limits; returns the documents written."""
    written = 0
    for item in progress.counting(_items(source, result), progress_dir, f"{source.name} record"):
        if isinstance(item, Rejected):
            _reject(source, item, result)
            continue
        result.count("docs_in")
        reason = _drop_reason(source, item, seed)
        if reason:
            result.count(f"dropped/ingest/{reason}")
            continue
        writer.write(item)
        result.count("docs_out")
        written += 1
        if source.max_docs is not None and written >= source.max_docs:
            break
    return written


def _drop_reason(source: SourceBase, doc: Document, seed: int) -> str | None:
    if not doc.text.strip():
        return "empty"
    if len(doc.text) > source.max_doc_chars:
        return "too_long"
    if not keep_sampled(doc.id, source.sample_rate, seed):
        return "sampled_out"
    return None


def _reject(source: SourceBase, item: Rejected, result: StageResult) -> None:
    """Counts a rejected record as a dropped document, and every problem per file and reason."""
    if item.is_record:
        result.count("docs_in")
        result.count(f"dropped/ingest/{item.reason}")
    result.count(f"bad/{source.name}/{item.label or Path(item.path).name}/{item.reason}")
    result.bad(item.path, item.reason, item.detail, item.where)
    result.bad_inputs[-1]["source"] = source.name


def hf_revision(source: HfSource, result: StageResult) -> str | None:
    """The commit to stream (what the fingerprint saw, asked again), recorded in `_SUCCESS.json`'s artifacts.

    Unresolved (offline), the source's pinned revision, if any, is streamed.
    """
    signature = hub.revision_signature(source.dataset, source.revision)
    result.artifacts.setdefault("hf_revisions", {})[source.name] = signature
    return signature if hub.COMMIT_HASH.match(signature) else source.revision


def file_labels(files: list[Path]) -> dict[Path, str]:
    """How each file is named in ids and stats: its name, or, when names repeat, its path below the common folder."""
    names = [p.name for p in files]
    if len(set(names)) == len(names):
        return {p: p.name for p in files}
    base = Path(os.path.commonpath([p.parent for p in files]))
    return {p: p.relative_to(base).as_posix() for p in files}


def _items(source: SourceBase, result: StageResult) -> Iterator[Document | Rejected]:
    """Every Document and Rejected of one source, file after file."""
    if isinstance(source, WikiOfflineSource):
        yield from read_wiki_offline(source)
        return
    if isinstance(source, HfSource):
        yield from read_hf(source, hf_revision(source, result))
        return
    assert isinstance(source, FileSource)
    files, missing = resolve_paths(source.paths)
    for pattern in missing:
        is_dir = Path(pattern).expanduser().is_dir()
        detail = f"a folder: name its files, e.g. {pattern.rstrip('/')}/*" if is_dir else "no file matches"
        yield Rejected("missing_file", pattern, None, detail, is_record=False)
    labels = file_labels(files)
    for path in files:
        yield from _file_items(source, path, labels[path])


def _file_items(source: FileSource, path: Path, label: str) -> Iterator[Document | Rejected]:
    """One file's Documents and Rejected, the latter tagged with the file's label."""
    try:
        for item in read_source_file(source, path, label):
            if isinstance(item, Rejected):
                item.label = label
            yield item
    except OSError as err:
        yield Rejected("unreadable_file", str(path), None, str(err), is_record=False, label=label)
