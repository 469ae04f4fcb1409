"""The curate recipe: one sub-model per step, every threshold a knob, defaults = FineWeb."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from storage.configbase import StrictModel, SwitchableStep
from tasks.docpipe.config import ExecutorConfig

LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(-[A-Za-z]{2,8})?")


class URLFilterConfig(SwitchableStep):
    """datatrove's URLFilter with its bundled block lists (FineWeb step 1)."""

    soft_word_threshold: int = Field(2, ge=1)
    extra_domains: list[str] = []
    extra_urls: list[str] = []
    banned_words: list[str] = []


class ExtractConfig(SwitchableStep):
    """Trafilatura on documents whose `metadata.content_type` is HTML; plain text skips it."""

    favour_precision: bool = True
    timeout_s: float = Field(1.0, gt=0, description="CPU seconds per document (so the machine's load changes "
                             "nothing); a slower document is dropped as `timeout`")


class LanguageConfig(SwitchableStep):
    """Keep documents in `languages` whose score is >= `threshold` (FineWeb: English, 0.65)."""

    # the quality filters pick their word tokenizer from `languages`, with or without this step
    used_while_disabled = frozenset({"languages"})

    backend: Literal["pycld2", "langid", "lingua", "fasttext"] = "pycld2"
    languages: list[str] = ["en"]
    threshold: float = Field(0.65, ge=0.0, le=1.0)
    model_path: Path | None = None

    @field_validator("languages")
    @classmethod
    def _languages_given(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one language to keep (ISO 639-1 codes such as 'en')")
        # what the backends report: lowercase ISO 639-1/-3 codes, CLD2 adds a script or region ('zh-Hant')
        bad = [code for code in value if not LANGUAGE_CODE.fullmatch(code)]
        if bad:
            raise ValueError(f"{bad}: not language codes as the backends report them (lowercase ISO 639 codes "
                             "such as 'en', 'fr', 'zh-Hant'); a document in any other spelling is always dropped")
        return value

    @model_validator(mode="after")
    def _fasttext_needs_model(self) -> "LanguageConfig":
        if self.backend == "fasttext" and self.model_path is None:
            raise ValueError("language.model_path (a local lid.176.bin) is required when backend is 'fasttext'")
        return self

    def output_fields(self) -> dict[str, Any]:
        """Only the fastText backend reads `model_path` (a grid may vary the backend under one base recipe)."""
        data = super().output_fields()
        if self.backend != "fasttext":
            data["model_path"] = None
        return data


class GopherRepetitionConfig(SwitchableStep):
    """Gopher repetition filter (Rae et al. 2021, table A1), FineWeb's thresholds."""

    dup_line_frac: float = Field(0.3, ge=0.0, le=1.0)
    dup_para_frac: float = Field(0.3, ge=0.0, le=1.0)
    dup_line_char_frac: float = Field(0.2, ge=0.0, le=1.0)
    dup_para_char_frac: float = Field(0.2, ge=0.0, le=1.0)
    top_n_grams: dict[int, float] = {2: 0.20, 3: 0.18, 4: 0.16}
    dup_n_grams: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}

    @field_validator("top_n_grams", "dup_n_grams")
    @classmethod
    def _n_gram_fractions(cls, value: dict[int, float]) -> dict[int, float]:
        for n, frac in value.items():
            if n < 1 or not 0.0 <= frac <= 1.0:
                raise ValueError(f"n-gram {n}: {frac} (n must be >= 1, the fraction within 0..1)")
        return value


class GopherQualityConfig(SwitchableStep):
    """Gopher quality filter, FineWeb's thresholds."""

    min_doc_words: int = Field(50, ge=0)
    max_doc_words: int = Field(100_000, ge=1)
    min_avg_word_length: float = Field(3, ge=0)
    max_avg_word_length: float = Field(10, ge=0)
    max_symbol_word_ratio: float = Field(0.1, ge=0)
    max_bullet_lines_ratio: float = Field(0.9, ge=0.0, le=1.0)
    max_ellipsis_lines_ratio: float = Field(0.3, ge=0.0, le=1.0)
    max_non_alpha_words_ratio: float = Field(0.8, ge=0.0, le=1.0, description="min share of words with a letter")
    min_stop_words: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _ranges(self) -> "GopherQualityConfig":
        if self.min_doc_words > self.max_doc_words:
            raise ValueError(f"gopher_quality.min_doc_words ({self.min_doc_words}) > max_doc_words")
        if self.min_avg_word_length > self.max_avg_word_length:
            raise ValueError(f"gopher_quality.min_avg_word_length ({self.min_avg_word_length}) > max_avg_word_length")
        return self


class C4QualityConfig(SwitchableStep):
    """C4 quality filter; FineWeb keeps lines without terminal punctuation."""

    filter_no_terminal_punct: bool = False
    min_num_sentences: int = Field(5, ge=-1, description="-1 disables")
    min_words_per_line: int = Field(3, ge=-1, description="-1 disables")
    max_word_length: int = Field(1000, ge=-1, description="-1 disables")
    remove_citations: bool = True
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebQualityConfig(SwitchableStep):
    """FineWeb's own quality filter."""

    line_punct_thr: float = Field(0.12, ge=0.0, le=1.0)
    short_line_thr: float = Field(0.67, ge=0.0, le=1.0)
    short_line_length: int = Field(30, ge=0)
    char_duplicates_ratio: float = Field(0.01, ge=0.0, le=1.0)
    new_line_ratio: float = Field(0.3, ge=0.0)


class PIIConfig(SwitchableStep):
    """Replaces email addresses and public IP addresses (FineWeb's last step)."""

    remove_emails: bool = True
    remove_ips: bool = True
    only_remove_public_ips: bool = True


class CurateConfig(StrictModel):
    """FineWeb's curation recipe, in FineWeb's order; each step switchable, each threshold a knob."""

    url_filter: URLFilterConfig = URLFilterConfig()
    extract: ExtractConfig = ExtractConfig()
    language: LanguageConfig = LanguageConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    c4_quality: C4QualityConfig = C4QualityConfig()
    fineweb_quality: FineWebQualityConfig = FineWebQualityConfig()
    pii: PIIConfig = PIIConfig()
    write_excluded: bool = Field(False, description="write each filter's removed documents to excluded/<filter>/")
    sample_rate: float = Field(1.0, gt=0.0, le=1.0, description="keep this seeded fraction of documents first")
    executor: ExecutorConfig = ExecutorConfig()
