"""The curate pipeline as datatrove steps, in FineWeb's order, built from the recipe."""
from __future__ import annotations

from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.utils.word_tokenizers import load_word_tokenizer

from storage.stage import StageError
from tasks.curate.config import CurateConfig
from tasks.curate.filters import HtmlExtractor, LanguageIdFilter, OfflineURLFilter
from tasks.docpipe.funnel import Scratch
from tasks.curate.langid import make_backend
from tasks.docpipe.steps import DocumentParquetWriter, DocumentReader, FunnelFilter, FunnelStep, HashSampler, excluded_writer

# Fixed funnel numbers: a disabled step disappears from the funnel, the others keep their number.
STEP_ORDER = ("sample", "url_filter", "extract", "language", "gopher_repetition", "gopher_quality",
              "c4_quality", "fineweb_quality", "pii")


def label(name: str) -> str:
    return f"{STEP_ORDER.index(name):02d}_{name}"


def build_pipeline(config: CurateConfig, scratch: Scratch, plan_file: Path,
                   seed: int) -> tuple[list[str], list[PipelineStep]]:
    """`[reader, *funnel steps, writer]` and the labels of the funnel steps."""
    steps = build_steps(config, seed, scratch)
    reader = DocumentReader(str(plan_file), str(scratch.problems))
    writer = DocumentParquetWriter(str(scratch.output))
    return [name for name, _ in steps], [reader, *(step for _, step in steps), writer]


def build_steps(config: CurateConfig, seed: int, scratch: Scratch) -> list[tuple[str, PipelineStep]]:
    """The enabled steps, each wrapped with its funnel counters, labelled `NN_name`."""
    built = []
    for name, inner in _inner_steps(config, seed, scratch):
        wrapped = (FunnelFilter(label(name), inner, str(scratch.problems)) if isinstance(inner, BaseFilter)
                   else FunnelStep(label(name), inner))
        built.append((label(name), wrapped))
    return built


def _excluded(config: CurateConfig, scratch: Scratch, name: str) -> DocumentParquetWriter | None:
    return excluded_writer(str(scratch.output / "excluded" / name)) if config.write_excluded else None


def word_language(config: CurateConfig) -> str:
    """The language of the quality filters' word tokenizer: the one kept language (its base code: CLD2's
    `zh-Hant` is `zh`), else English. A language datatrove has no tokenizer for, or whose package is
    missing, fails here, before any rank runs (it used to make every document an `error` drop)."""
    languages = config.language.languages
    lang = languages[0].split("-")[0] if len(languages) == 1 else "en"
    quality = (config.gopher_repetition, config.gopher_quality, config.c4_quality, config.fineweb_quality)
    if any(step.enabled for step in quality):
        try:
            # built, not used: loading it (spaCy, and torch with it) is the ranks' job, not the driver's
            load_word_tokenizer(lang)
        except (ImportError, ValueError) as err:
            raise StageError(f"curate: language.languages={languages}: the quality filters' word tokenizer for "
                             f"{lang!r} is not available ({err}); install it, or disable gopher_repetition, "
                             "gopher_quality, c4_quality and fineweb_quality") from None
    return lang


def _inner_steps(config: CurateConfig, seed: int, scratch: Scratch) -> list[tuple[str, PipelineStep]]:
    lang = word_language(config)
    steps: list[tuple[str, PipelineStep]] = []
    if config.sample_rate < 1.0:
        steps.append(("sample", HashSampler(config.sample_rate, seed)))
    if config.url_filter.enabled:
        steps.append(("url_filter", _url_filter(config, scratch)))
    if config.extract.enabled:
        steps.append(("extract", HtmlExtractor(favour_precision=config.extract.favour_precision,
                                               timeout=config.extract.timeout_s)))
    if config.language.enabled:
        steps.append(("language", _language_filter(config, scratch)))
    if config.gopher_repetition.enabled:
        steps.append(("gopher_repetition", _gopher_repetition(config, scratch, lang)))
    if config.gopher_quality.enabled:
        steps.append(("gopher_quality", _gopher_quality(config, scratch, lang)))
    if config.c4_quality.enabled:
        steps.append(("c4_quality", _c4_quality(config, scratch, lang)))
    if config.fineweb_quality.enabled:
        steps.append(("fineweb_quality", _fineweb_quality(config, scratch, lang)))
    if config.pii.enabled:
        pii = config.pii
        steps.append(("pii", PIIFormatter(remove_emails=pii.remove_emails, remove_ips=pii.remove_ips,
                                          only_remove_public_ips=pii.only_remove_public_ips)))
    return steps


def _url_filter(config: CurateConfig, scratch: Scratch) -> OfflineURLFilter:
    opts = config.url_filter
    return OfflineURLFilter(soft_word_threshold=opts.soft_word_threshold, extra_domains=opts.extra_domains,
                            extra_urls=opts.extra_urls, banned_words=opts.banned_words,
                            exclusion_writer=_excluded(config, scratch, "url_filter"))


def _language_filter(config: CurateConfig, scratch: Scratch) -> LanguageIdFilter:
    opts = config.language
    if opts.backend == "fasttext" and not Path(opts.model_path).is_file():
        raise StageError(f"language.model_path: no fastText model at {opts.model_path} (download lid.176.bin "
                         "from https://fasttext.cc/docs/en/language-identification.html; nothing is fetched at run time)")
    return LanguageIdFilter(make_backend(opts.backend, opts.model_path), opts.languages, opts.threshold,
                            exclusion_writer=_excluded(config, scratch, "language"))


def _gopher_repetition(config: CurateConfig, scratch: Scratch, lang: str) -> GopherRepetitionFilter:
    opts = config.gopher_repetition
    return GopherRepetitionFilter(
        dup_line_frac=opts.dup_line_frac, dup_para_frac=opts.dup_para_frac,
        dup_line_char_frac=opts.dup_line_char_frac, dup_para_char_frac=opts.dup_para_char_frac,
        top_n_grams=tuple(sorted(opts.top_n_grams.items())), dup_n_grams=tuple(sorted(opts.dup_n_grams.items())),
        exclusion_writer=_excluded(config, scratch, "gopher_repetition"), language=lang)


def _gopher_quality(config: CurateConfig, scratch: Scratch, lang: str) -> GopherQualityFilter:
    opts = config.gopher_quality
    return GopherQualityFilter(
        min_doc_words=opts.min_doc_words, max_doc_words=opts.max_doc_words,
        min_avg_word_length=opts.min_avg_word_length, max_avg_word_length=opts.max_avg_word_length,
        max_symbol_word_ratio=opts.max_symbol_word_ratio, max_bullet_lines_ratio=opts.max_bullet_lines_ratio,
        max_ellipsis_lines_ratio=opts.max_ellipsis_lines_ratio,
        max_non_alpha_words_ratio=opts.max_non_alpha_words_ratio, min_stop_words=opts.min_stop_words,
        exclusion_writer=_excluded(config, scratch, "gopher_quality"), language=lang)


def _c4_quality(config: CurateConfig, scratch: Scratch, lang: str) -> C4QualityFilter:
    opts = config.c4_quality
    return C4QualityFilter(
        filter_no_terminal_punct=opts.filter_no_terminal_punct, min_num_sentences=opts.min_num_sentences,
        min_words_per_line=opts.min_words_per_line, max_word_length=opts.max_word_length,
        remove_citations=opts.remove_citations, filter_lorem_ipsum=opts.filter_lorem_ipsum,
        filter_javascript=opts.filter_javascript, filter_curly_bracket=opts.filter_curly_bracket,
        filter_policy=opts.filter_policy, exclusion_writer=_excluded(config, scratch, "c4_quality"), language=lang)


def _fineweb_quality(config: CurateConfig, scratch: Scratch, lang: str) -> FineWebQualityFilter:
    opts = config.fineweb_quality
    return FineWebQualityFilter(
        line_punct_thr=opts.line_punct_thr, short_line_thr=opts.short_line_thr,
        short_line_length=opts.short_line_length, char_duplicates_ratio=opts.char_duplicates_ratio,
        new_line_ratio=opts.new_line_ratio, exclusion_writer=_excluded(config, scratch, "fineweb_quality"),
        language=lang)
