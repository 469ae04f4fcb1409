"""A task's examples through the tokenizer and the family's layout: features, and what decoding needs.

Texts are encoded as plain text (`encode_ordinary`: a `[SEP]` in a sentence stays text). A QA
example becomes one feature per context window, each keeping its tokens' character spans; a
sentence to tag becomes one feature per chunk of words that fits, its first word pieces labelled.
A training question whose `answer_start` does not point at its answer text is counted and left out
of training (its gold texts still score it when it is evaluated).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tasks.datasets.badrows import BadRow
from tasks.datasets.conll import TaggedSentence
from tasks.datasets.multiple_choice import ChoiceItem
from tasks.datasets.squad import SquadExample
from tasks.finetune.data import BadRowCounter, TaskData, TextExample
from tasks.finetune.encode import IGNORE, Encoded, Layout, token_spans
from tasks.finetune.features import Features
from tasks.finetune.nbest import max_context_flags


@dataclass(frozen=True)
class QaSettings:
    max_query_length: int
    doc_stride: int


@dataclass
class WindowMeta:
    """Where one QA feature's tokens sit in its question's context."""

    example: int
    offsets: list[tuple[int, int] | None]
    max_context: list[bool]
    null_index: int


@dataclass
class ChunkMeta:
    """Which words of a sentence one tagging feature holds, and the position of each word's first piece."""

    example: int
    first_word: int
    positions: list[int]


@dataclass
class Prepared:
    features: Features
    meta: list[Any] | None              # per feature: WindowMeta, ChunkMeta, or None for one feature per example
    examples: list[Any]
    counts: Counter = field(default_factory=Counter)


class Preparer:
    """Encodes one task's examples for one model family."""

    def __init__(self, data: TaskData, layout: Layout, encoding: Any, qa: QaSettings | None = None) -> None:
        self.data, self.layout, self.encoding, self.qa = data, layout, encoding, qa

    def encode_text(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def prepare(self, examples: list[Any], training: bool, bad: BadRowCounter, source: str) -> Prepared:
        form = self.data.form
        if form == "qa":
            return self._qa(examples, training, bad, source)
        if form == "tagging":
            return self._tagging(examples)
        if form == "choice":
            return self._choices(examples)
        return self._texts(examples)

    # ---- classification and regression ------------------------------------------------------

    def _texts(self, examples: list[TextExample]) -> Prepared:
        counts, encoded = Counter(), []
        texts_a = self.encoding.encode_ordinary_batch([e.text_a for e in examples])
        texts_b = self.encoding.encode_ordinary_batch([e.text_b or "" for e in examples])
        for example, a, b in zip(examples, texts_a, texts_b):
            item = self._text(a, b if example.text_b is not None else None)
            item.label = self._label(example.label)
            counts["truncated"] += item.truncated
            encoded.append(item)
        kind = "score" if self.data.regression else "class"
        return Prepared(Features.build(encoded, kind), None, examples, counts)

    def _text(self, a: list[int], b: list[int] | None) -> Encoded:
        if b is None:
            return self.layout.single(a)
        return self.layout.similarity(a, b) if self.data.form == "similarity" else self.layout.pair(a, b)

    def _label(self, label: Any) -> int | float:
        return float(label) if self.data.regression else self.data.labels.index(label)

    # ---- multiple choice -----------------------------------------------------------------------

    def _choices(self, items: list[ChoiceItem]) -> Prepared:
        """One (context, answer) sequence per answer; the label is the right answer's index."""
        counts, encoded = Counter(), []
        for item in items:
            contexts = self.encoding.encode_ordinary_batch(list(item.contexts))
            answers = self.encoding.encode_ordinary_batch(list(item.continuations))
            choice = self.layout.choices(list(zip(contexts, answers)))
            choice.label = item.label
            counts["truncated"] += choice.truncated
            encoded.append(choice)
        return Prepared(Features.build(encoded, "class"), None, items, counts)

    # ---- tagging -------------------------------------------------------------------------------

    def _tagging(self, sentences: list[TaggedSentence]) -> Prepared:
        encoded, meta, counts = [], [], Counter()
        capacity = self.layout.tagging_capacity()
        for index, sentence in enumerate(sentences):
            pieces = [self.encode_text(word if i == 0 else " " + word)[:capacity] for i, word in
                      enumerate(sentence.tokens)]
            for first, last in _chunks([len(p) for p in pieces], capacity):
                item, chunk = self._chunk(sentence, pieces, first, last, index)
                encoded.append(item)
                meta.append(chunk)
                counts["chunks"] += 1
        return Prepared(Features.build(encoded, "tags"), meta, sentences, counts)

    def _chunk(self, sentence: TaggedSentence, pieces: list[list[int]], first: int, last: int,
               index: int) -> tuple[Encoded, ChunkMeta]:
        flat = [t for word in pieces[first:last] for t in word]
        item, offset = self.layout.tagging(flat)
        positions, tags = [], [IGNORE] * len(item.sequences[0])
        for word in range(first, last):
            positions.append(offset)
            tag = sentence.tags[word]
            tags[offset] = self.data.labels.index(tag) if tag in self.data.labels else IGNORE
            offset += len(pieces[word])
        item.label = tags
        return item, ChunkMeta(index, first, positions)

    # ---- extractive QA -------------------------------------------------------------------------

    def _qa(self, examples: list[SquadExample], training: bool, bad: BadRowCounter, source: str) -> Prepared:
        encoded, meta, kept, counts = [], [], [], Counter()
        for example in examples:
            answer = self._answer_chars(example, source, bad if training else None)
            if training and answer is None and example.answers:
                continue               # its answer_start is wrong: never train on a mislabelled span
            index = len(kept)
            kept.append(example)
            windows = self._windows(example, answer, index)
            counts["windows"] += len(windows)
            for item, window in windows:
                encoded.append(item)
                meta.append(window)
        if not encoded:
            raise ValueError(f"{source}: no usable question")
        return Prepared(Features.build(encoded, "span"), meta, kept, counts)

    def _answer_chars(self, example: SquadExample, source: str,
                      bad: BadRowCounter | None) -> tuple[int, int] | None:
        """The first answer's character span, once checked against the context (a mismatch goes to `bad`)."""
        if not example.answers:
            return None
        answer = example.answers[0]
        if example.context[answer.start:answer.start + len(answer.text)] != answer.text:
            found = example.context[answer.start:answer.start + len(answer.text)]
            if bad is not None:
                bad(BadRow(source, None, "answer_start_mismatch", f"question {example.id}: answer_start "
                           f"{answer.start} points at {found!r}, not the answer {answer.text!r}; left out of training"))
            return None
        return answer.start, answer.start + len(answer.text)

    def _windows(self, example: SquadExample, answer: tuple[int, int] | None,
                 index: int) -> list[tuple[Encoded, WindowMeta]]:
        question = self.encode_text(example.question.strip())[: self.qa.max_query_length]
        context = self.encode_text(example.context)
        spans = token_spans(example.context, context, self.encoding)
        capacity = self.layout.qa_capacity(question)
        starts = window_starts(len(context), capacity, self.qa.doc_stride)
        lengths = [min(capacity, len(context) - s) for s in starts]
        flags = max_context_flags(starts, lengths)
        answer_tokens = _answer_tokens(spans, answer) if answer else None
        return [self._window(question, context, spans, start, length, flag, answer_tokens, index)
                for start, length, flag in zip(starts, lengths, flags)]

    def _window(self, question: list[int], context: list[int], spans: list[tuple[int, int]], start: int, length: int,
                flags: list[bool], answer: tuple[int, int] | None, index: int) -> tuple[Encoded, WindowMeta]:
        item, first, null = self.layout.qa(question, context[start:start + length])
        size = len(item.sequences[0])
        offsets: list[tuple[int, int] | None] = [None] * size
        max_context = [False] * size
        for i in range(length):
            offsets[first + i], max_context[first + i] = spans[start + i], flags[i]
        inside = answer is not None and start <= answer[0] and answer[1] < start + length
        item.label = (first + answer[0] - start, first + answer[1] - start) if inside else (null, null)
        return item, WindowMeta(index, offsets, max_context, null)


def window_starts(n_tokens: int, capacity: int, stride: int) -> list[int]:
    """Where each window of `capacity` context tokens starts: `min(stride, capacity)` apart, the last one
    reaching the end (BERT's doc spans)."""
    if capacity < 1:
        raise ValueError(f"the question leaves no room for context (capacity {capacity}); lower max_query_length")
    starts, start = [], 0
    while True:
        starts.append(start)
        if start + capacity >= n_tokens:
            return starts
        start += min(stride, capacity)


def _answer_tokens(spans: list[tuple[int, int]], answer: tuple[int, int]) -> tuple[int, int] | None:
    """The first and last token overlapping the answer's characters."""
    inside = [i for i, (s, e) in enumerate(spans) if s < answer[1] and e > answer[0]]
    return (inside[0], inside[-1]) if inside else None


def _chunks(piece_counts: list[int], capacity: int) -> list[tuple[int, int]]:
    """Consecutive word ranges [first, last) whose pieces fit in `capacity` tokens."""
    chunks, first, used = [], 0, 0
    for word, count in enumerate(piece_counts):
        if used + count > capacity and word > first:
            chunks.append((first, word))
            first, used = word, 0
        used += count
    chunks.append((first, len(piece_counts)))
    return chunks
