"""Examples to token sequences, for each family's way of reading a task (torch-free).

BERT (Devlin et al. 2019): `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` with segment ids 0/1; the
classifier reads `[CLS]`; extractive QA reads `[CLS] question [SEP] context [SEP]`, `[CLS]` standing
for "no answer".

GPT (Radford et al. 2018, figure 1): `start text extract`; entailment `start premise delim
hypothesis extract`; similarity both orders, `start A delim B extract` and `start B delim A extract`
(the two extract states are summed); multiple choice one `start context delim answer extract` per
answer. The classifier reads the `extract` token. QA reads `start question delim context extract`
(the context last, so every context token has seen the question; `extract` stands for no answer).

Sequences longer than `max_length` are cut (the longer text of a pair first, as BERT does); a QA
context is split into windows `doc_stride` tokens apart, each token keeping its character span.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE = -100


@dataclass(frozen=True)
class Specials:
    """The ids a layout adds around the text: BERT's [CLS]/[SEP]/[PAD], or GPT-1's start/delim/extract."""

    start: int          # [CLS] | start
    delim: int          # [SEP] | delim
    extract: int        # [SEP] (BERT closes with it) | extract
    pad: int


@dataclass
class Encoded:
    """One example as the model sees it: `sequences` (1, 2 for GPT similarity, or one per choice)."""

    sequences: list[list[int]]
    segments: list[list[int]] | None = None
    label: Any = None                  # class index, score, (start, end) token pair, or per-token tags
    truncated: bool = False


def truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int], bool]:
    """Drops tokens from the end of the longer text until both fit in `budget` (BERT's _truncate_seq_pair)."""
    a, b, cut = list(a), list(b), False
    while len(a) + len(b) > budget:
        (a if len(a) > len(b) else b).pop()
        cut = True
    return a, b, cut


class Layout:
    """How a family lays texts out; `bert` and `gpt` below differ only where the papers do."""

    family: str

    def __init__(self, specials: Specials, max_length: int) -> None:
        self.ids, self.max_length = specials, max_length

    def single(self, a: list[int]) -> Encoded:
        raise NotImplementedError

    def pair(self, a: list[int], b: list[int]) -> Encoded:
        raise NotImplementedError

    def similarity(self, a: list[int], b: list[int]) -> Encoded:
        return self.pair(a, b)

    def choices(self, pairs: list[tuple[list[int], list[int]]]) -> Encoded:
        """One `pair(context, answer)` sequence per answer (contexts may differ: WinoGrande's options)."""
        encoded = [self.pair(context, answer) for context, answer in pairs]
        segments = [e.segments[0] for e in encoded] if encoded[0].segments else None
        return Encoded([e.sequences[0] for e in encoded], segments, truncated=any(e.truncated for e in encoded))

    def qa(self, question: list[int], window: list[int]) -> tuple[Encoded, int, int]:
        """(the window's sequence, index of its first context token, the no-answer index)."""
        raise NotImplementedError

    def qa_capacity(self, question: list[int]) -> int:
        """Context tokens that fit beside `question` (three added tokens in both families)."""
        return self.max_length - len(question) - 3

    def tagging(self, pieces: list[int]) -> tuple[Encoded, int]:
        """(the sentence's sequence, index of its first word piece)."""
        raise NotImplementedError

    def tagging_capacity(self) -> int:
        raise NotImplementedError


class BertLayout(Layout):
    family = "bert"

    def single(self, a: list[int]) -> Encoded:
        cut = len(a) > self.max_length - 2
        a = a[: self.max_length - 2]
        ids = [self.ids.start, *a, self.ids.delim]
        return Encoded([ids], [[0] * len(ids)], truncated=cut)

    def pair(self, a: list[int], b: list[int]) -> Encoded:
        a, b, cut = truncate_pair(a, b, self.max_length - 3)
        ids = [self.ids.start, *a, self.ids.delim, *b, self.ids.delim]
        return Encoded([ids], [[0] * (len(a) + 2) + [1] * (len(b) + 1)], truncated=cut)

    def qa(self, question: list[int], window: list[int]) -> tuple[Encoded, int, int]:
        ids = [self.ids.start, *question, self.ids.delim, *window, self.ids.delim]
        segments = [0] * (len(question) + 2) + [1] * (len(window) + 1)
        return Encoded([ids], [segments]), len(question) + 2, 0

    def tagging(self, pieces: list[int]) -> tuple[Encoded, int]:
        ids = [self.ids.start, *pieces, self.ids.delim]
        return Encoded([ids], [[0] * len(ids)]), 1

    def tagging_capacity(self) -> int:
        return self.max_length - 2


class GptLayout(Layout):
    family = "gpt"

    def single(self, a: list[int]) -> Encoded:
        cut = len(a) > self.max_length - 2
        return Encoded([[self.ids.start, *a[: self.max_length - 2], self.ids.extract]], truncated=cut)

    def pair(self, a: list[int], b: list[int]) -> Encoded:
        a, b, cut = truncate_pair(a, b, self.max_length - 3)
        return Encoded([[self.ids.start, *a, self.ids.delim, *b, self.ids.extract]], truncated=cut)

    def similarity(self, a: list[int], b: list[int]) -> Encoded:
        a, b, cut = truncate_pair(a, b, self.max_length - 3)
        first = [self.ids.start, *a, self.ids.delim, *b, self.ids.extract]
        second = [self.ids.start, *b, self.ids.delim, *a, self.ids.extract]
        return Encoded([first, second], truncated=cut)

    def qa(self, question: list[int], window: list[int]) -> tuple[Encoded, int, int]:
        ids = [self.ids.start, *question, self.ids.delim, *window, self.ids.extract]
        return Encoded([ids]), len(question) + 2, len(ids) - 1

    def tagging(self, pieces: list[int]) -> tuple[Encoded, int]:
        return Encoded([[self.ids.start, *pieces]]), 1

    def tagging_capacity(self) -> int:
        return self.max_length - 1


LAYOUTS: dict[str, type[Layout]] = {"bert": BertLayout, "gpt": GptLayout}


def make_layout(family: str, specials: Specials, max_length: int) -> Layout:
    return LAYOUTS[family](specials, max_length)


# ---- character offsets ------------------------------------------------------------------------


def token_spans(text: str, tokens: list[int], encoding: Any) -> list[tuple[int, int]]:
    """The character span of each token in `text`, leading whitespace trimmed (as HF's trim_offsets).

    Tokens that share the bytes of one character share its span.
    """
    decoded, starts = encoding.decode_with_offsets(tokens)
    if decoded != text:
        raise ValueError("the tokenizer does not round-trip this text; character offsets would be wrong")
    spans, n = [], len(starts)
    for i, start in enumerate(starts):
        j = i + 1
        while j < n and starts[j] == start:
            j += 1
        spans.append(_trim(text, start, starts[j] if j < n else len(text)))
    return spans


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    trimmed = start
    while trimmed < end and text[trimmed].isspace():
        trimmed += 1
    return (trimmed, end) if trimmed < end else (start, end)
