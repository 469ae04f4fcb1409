"""datatrove's URL filter, Trafilatura extractor and language filter, adapted to run offline on our documents.

- `OfflineURLFilter`: the bundled block lists and the bundled public-suffix snapshot (the stock
  filter asks publicsuffix.org first); documents without a URL (plain-text sources) pass; the lists
  (~4.5M domains, ~4 s to load) are loaded once per process, not once per rank.
- `HtmlExtractor`: Trafilatura only for documents whose `content_type` is HTML; every drop has a
  reason (`empty`, `timeout`, `crash`, `error`).
- `LanguageIdFilter`: an offline backend from `langid.py`, an explicit list of kept languages.
"""
from __future__ import annotations

import signal
import time
from typing import Any

import psutil

from datatrove.data import Document as DtDocument
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.extractors.base import ExtractorSandbox
from datatrove.pipeline.extractors.trafilatura import Trafilatura
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.url_filter import URLFilter
from datatrove.utils.logging import logger

from tasks.curate.langid import LanguageBackend, forget_models

HTML_TYPES = ("text/html", "application/xhtml+xml")
POLL_S = 0.02            # how often a waiting extraction checks the sandbox's CPU time
HANG_AFTER_S = 30.0      # wall time after which a sandbox that does not answer is cut off, however idle
WARMUP_HTML = "<html><body><p>Warming up the extractor with one short paragraph.</p></body></html>"
# Block lists per process, keyed by the extra entries the recipe adds (see OfflineURLFilter).
_URL_LISTS: dict[tuple, dict[str, Any]] = {}
_URL_LIST_ATTRS = ("block_listed_domains", "block_listed_url", "banned_words", "banned_subwords",
                   "soft_banned_words", "banned_subwords_automaton")


def release_caches() -> None:
    """Forgets the block lists and language models this process loaded (called when a stage ends)."""
    _URL_LISTS.clear()
    forget_models()


class OfflineURLFilter(URLFilter):
    """FineWeb's URL filter without network access; drop reasons are datatrove's (`domain`, `url`, ...)."""

    def __init__(self, soft_word_threshold: int = 2, extra_domains: list[str] | None = None,
                 extra_urls: list[str] | None = None, banned_words: list[str] | None = None,
                 exclusion_writer: Any = None) -> None:
        super().__init__(soft_word_threshold=soft_word_threshold, extra_domains=extra_domains,
                         extra_urls=extra_urls, banned_words=banned_words, exclusion_writer=exclusion_writer)
        from tldextract import TLDExtract

        # suffix_list_urls=() makes tldextract use the snapshot shipped in its wheel, never the network
        self.tldextractor = TLDExtract(suffix_list_urls=(), cache_dir=None)
        self._lists_key = (tuple(sorted(extra_domains or ())), tuple(sorted(extra_urls or ())),
                           tuple(sorted(banned_words or ())))

    def download_data(self) -> None:
        if self._downloaded:
            return
        cached = _URL_LISTS.get(self._lists_key)
        if cached is None:
            super().download_data()
            _URL_LISTS[self._lists_key] = {name: getattr(self, name) for name in _URL_LIST_ATTRS}
        else:
            for name, value in cached.items():
                setattr(self, name, value)
            self._downloaded = True

    def filter(self, document: DtDocument) -> bool | tuple[bool, str]:
        if not document.metadata.get("url"):
            self.stat_update("no_url")
            return True
        return super().filter(document)


class QuietSandbox(ExtractorSandbox):
    """datatrove's extraction sandbox, whose process ends plainly when it is terminated, and whose
    timeout counts the CPU time the sandbox spends on a document, not the wall time.

    The sandbox is forked from the stage's process and inherits its SIGTERM handler; inside a
    Prefect task that handler raises, which printed a traceback at every clean-up and timeout.
    datatrove's timeout is wall time, which grows with the machine's load: under load the same
    recipe dropped a page in one run and kept it in the next. A process that waits rather than works
    is still cut off, after `hang_after_s` of wall time.
    """

    def __init__(self, timeout: float, warmup_text: str = "", hang_after_s: float | None = None) -> None:
        super().__init__(timeout, warmup_text)
        self.hang_after_s = hang_after_s if hang_after_s is not None else max(HANG_AFTER_S, 10 * timeout)

    def _worker(self, conn: Any, extract_fn: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        super()._worker(conn, extract_fn)

    def process_document(self, text: str, extract_fn: Any) -> Any:
        self._ensure_process(extract_fn)
        try:
            self.parent_conn.send(text)
            return self._await_result()
        except (TimeoutError, EOFError):
            self._cleanup_process()
            raise

    def _await_result(self) -> Any:
        """The sandbox's answer; TimeoutError past `timeout` CPU seconds or `hang_after_s` wall seconds."""
        cpu_start, wall_start = self._cpu_seconds(), time.monotonic()
        while not self.parent_conn.poll(POLL_S):
            if not self.process.is_alive():
                raise EOFError("the sandbox process died (probably OOM-killed)")
            if (self._cpu_seconds() - cpu_start >= self.timeout
                    or time.monotonic() - wall_start >= self.hang_after_s):
                raise TimeoutError("document extraction timed out")
        result = self.parent_conn.recv()
        if isinstance(result, Exception):
            raise result
        return result

    def _cpu_seconds(self) -> float:
        try:
            times = psutil.Process(self.process.pid).cpu_times()
        except psutil.Error:        # gone: the next is_alive() says so
            return 0.0
        return times.user + times.system


def is_html(doc: DtDocument) -> bool:
    return str(doc.metadata.get("content_type") or "").lower().startswith(HTML_TYPES)


class HtmlExtractor(Trafilatura):
    """Trafilatura (`favour_precision`) on HTML documents, each in a sandbox process with a timeout.

    Counters: `total` (HTML documents), `passthrough` (plain text), `forwarded`, `dropped` and
    `dropped_<reason>`: `empty` (nothing extracted), `timeout`, `crash` (the sandbox process died),
    `error` (Trafilatura raised). `flagged_replacement_char` counts HTML that holds U+FFFD, the mark
    of bytes ingest could not decode.
    """

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        # One extraction here first: the sandbox process is forked from this one and starts warm
        # (imports and Trafilatura's lazy set-up done), well within its start-up timeout.
        self.extract(WARMUP_HTML)
        with QuietSandbox(timeout=self.timeout, warmup_text=WARMUP_HTML) as sandbox:
            for doc in data:
                if not is_html(doc):
                    self.stat_update("passthrough")
                    yield doc
                    continue
                self.stat_update("total")
                if "\ufffd" in doc.text:
                    self.stat_update("flagged_replacement_char")
                with self.track_time():
                    reason = self._extract_into(doc, sandbox)
                if reason:
                    self.stat_update("dropped", f"dropped_{reason}")
                    continue
                self.stat_update("forwarded")
                self.update_doc_stats(doc)
                yield doc

    def _extract_into(self, doc: DtDocument, sandbox: ExtractorSandbox) -> str | None:
        """Replaces the HTML by its text; returns the drop reason, or None when text was kept."""
        try:
            text = sandbox.process_document(doc.text, self.extract)
        except TimeoutError:
            logger.warning(f"extract: timeout after {self.timeout}s on document {doc.id}")
            return "timeout"
        except EOFError:
            logger.warning(f"extract: the sandbox process died on document {doc.id}")
            return "crash"
        except Exception as err:
            logger.warning(f"extract: {type(err).__name__} on document {doc.id}: {err}")
            return "error"
        if not text or not text.strip():
            return "empty"
        doc.text = text
        doc.metadata.update(content_type="text/plain", extracted_from="text/html", extractor="trafilatura")
        return None


class LanguageIdFilter(BaseFilter):
    """Keeps documents whose top language is listed and scores at least `threshold`.

    Sets `metadata.language` and `metadata.language_score` on every document; a drop's reason is the
    detected language (`de`, `zh`, `unknown`, ...) or `below_threshold` for a listed language.
    """

    name = "🌍 Language ID (offline)"

    def __init__(self, backend: LanguageBackend, languages: list[str], threshold: float,
                 exclusion_writer: Any = None) -> None:
        super().__init__(exclusion_writer)
        self.backend = backend
        self.languages = frozenset(languages)
        self.threshold = threshold

    def filter(self, doc: DtDocument) -> bool | tuple[bool, str]:
        lang, score = self.backend.predict(doc.text)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(score, 4)
        if lang not in self.languages:
            return False, lang
        if score < self.threshold:
            return False, "below_threshold"
        return True
