"""Ingest recipe: a list of sources, each a kind with its own options."""
from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

from pydantic import AfterValidator, Field, field_validator

from storage.configbase import StrictModel

SOURCE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")
RESERVED_SOURCE_NAMES = frozenset({"excluded"})


def _check_source_name(name: str) -> str:
    """A source name is a folder name in the output: no '.', '..', '.tmp-' part or reserved name."""
    if not SOURCE_NAME.match(name):
        raise ValueError(f"source name {name!r}: use letters, digits, _ and -, in parts joined by single dots "
                         "(not starting with '.' or '-', not ending with '.')")
    if ".tmp-" in name:
        raise ValueError(f"source name {name!r}: must not contain '.tmp-' (readers hide such folders)")
    if name in RESERVED_SOURCE_NAMES:
        raise ValueError(f"source name {name!r} is reserved")
    return name


SourceName = Annotated[str, AfterValidator(_check_source_name),
                       Field(description="letters, digits, _ and -, in parts joined by dots")]


class SourceBase(StrictModel):
    name: SourceName
    max_docs: int | None = Field(None, ge=1, description="stop after this many documents from this source")
    sample_rate: float = Field(1.0, gt=0.0, le=1.0, description="keep a seeded random share of documents")
    max_doc_chars: int = Field(5_000_000, ge=1, description="longer documents are dropped and counted")


class FileSource(SourceBase):
    paths: list[str] = Field(min_length=1, description="files or globs, relative to the working directory")


class WarcSource(FileSource):
    kind: Literal["warc"]
    content_types: list[str] = ["text/html", "application/xhtml+xml"]


class JsonlSource(FileSource):
    kind: Literal["jsonl"]
    text_key: str = "text"
    id_key: str | None = "id"
    url_key: str | None = None


class ParquetSource(FileSource):
    kind: Literal["parquet"]
    text_column: str = "text"
    id_column: str | None = "id"
    url_column: str | None = None


class TextSource(FileSource):
    kind: Literal["text"]
    split: Literal["file", "blank_line"] = "file"
    encoding: str = Field("utf-8", description="the files' encoding, a Python codec that keeps ASCII as is "
                          "(latin-1, cp1252, ...); bytes it cannot decode become U+FFFD and are reported")

    @field_validator("encoding")
    @classmethod
    def _ascii_compatible_codec(cls, encoding: str) -> str:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r} (a Python codec name: utf-8, latin-1, cp1252, ...)") from None
        if "a\n".encode(encoding) != b"a\n":
            raise ValueError(f"{encoding!r} does not keep ASCII as is (lines are split on the byte \\n): "
                             "convert UTF-16/32 files to UTF-8 first")
        return encoding


class WikiOfflineSource(SourceBase):
    kind: Literal["wiki_offline"]
    languages: list[Literal["en", "es", "fr"]] = ["en"]


class HfSource(SourceBase):
    """A hub dataset, streamed. Its commit enters the fingerprint (`tasks.ingest.hub`): a new upstream commit
    rebuilds ingest; `revision` pins a commit hash, branch or tag (offline, the pinned one is all there is)."""

    kind: Literal["hf"]
    dataset: str
    subset: str | None = None
    split: str = "train"
    text_key: str = "text"
    id_key: str | None = "id"
    revision: str | None = Field(None, min_length=1, description="commit hash, branch or tag; default: the "
                                 "default branch's newest commit")


Source = Annotated[Union[WarcSource, JsonlSource, ParquetSource, TextSource, WikiOfflineSource, HfSource],
                   Field(discriminator="kind")]


class IngestConfig(StrictModel):
    sources: list[Source] = Field(min_length=1)
    non_output_fields: ClassVar[frozenset[str]] = frozenset()

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceBase]) -> list[SourceBase]:
        names = [s.name for s in sources]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"source names must be unique; repeated: {', '.join(duplicated)}")
        return sources


def resolve_paths(patterns: list[str]) -> tuple[list[Path], list[str]]:
    """Expands files and globs; returns (files found, patterns that matched nothing)."""
    found: list[Path] = []
    missing: list[str] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if any(ch in pattern for ch in "*?["):
            anchor = Path(path.anchor) if path.is_absolute() else Path(".")
            relative = str(path.relative_to(path.anchor)) if path.is_absolute() else pattern
            matches = sorted(p for p in anchor.glob(relative) if p.is_file())
        else:
            matches = [path] if path.is_file() else []
        (found.extend(m.resolve() for m in matches) if matches else missing.append(pattern))
    return list(dict.fromkeys(found)), missing
