"""From start/end logits over the windows of one question to its answer text (BERT's `run_squad` decoding).

Each window of a long context scores every token as an answer start and end. For each window the
`n_best` highest starts and ends are paired into spans inside the context, at most
`max_answer_length` tokens long, whose start token sees the most context in this window (a token in
two overlapping windows is judged where it has more words on both sides). All windows' spans are
ranked together by start + end logit; spans that give the same text are one candidate. The null
(no-answer) score is the lowest over windows of the null position's start + end, and
`null_odds = score_null - best_span`: SQuAD v2 answers "" when it exceeds the threshold.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_SPAN_ODDS = 1e6        # null_odds when no window holds a valid span: answer "no answer"


@dataclass
class Window:
    """One window's logits and where its tokens sit in the context."""

    start_logits: np.ndarray          # (length,)
    end_logits: np.ndarray            # (length,)
    offsets: list[tuple[int, int] | None]   # character span of each token in the context; None outside it
    max_context: list[bool]           # per token: does this window give it the most context?
    null_index: int                   # [CLS] (BERT) or the extract token (GPT)


@dataclass(frozen=True)
class Candidate:
    text: str
    score: float
    start_logit: float
    end_logit: float


def max_context_flags(window_starts: list[int], window_lengths: list[int]) -> list[list[bool]]:
    """For each window, whether each of its context tokens has its largest context there.

    A token's context in a window is min(tokens left of it, tokens right of it) + 0.01 * length.
    """
    best: dict[int, tuple[float, int]] = {}
    for w, (start, length) in enumerate(zip(window_starts, window_lengths)):
        for position in range(start, start + length):
            score = min(position - start, start + length - 1 - position) + 0.01 * length
            if position not in best or score > best[position][0]:
                best[position] = (score, w)
    return [[best[p][1] == w for p in range(start, start + length)]
            for w, (start, length) in enumerate(zip(window_starts, window_lengths))]


def top_indices(logits: np.ndarray, n: int) -> list[int]:
    """Indices of the `n` largest values, largest first (ties: lower index first)."""
    order = np.argsort(-logits, kind="stable")
    return [int(i) for i in order[:n]]


def window_spans(window: Window, context: str, n_best: int, max_answer_length: int) -> list[Candidate]:
    spans = []
    for start in top_indices(window.start_logits, n_best):
        for end in top_indices(window.end_logits, n_best):
            if window.offsets[start] is None or window.offsets[end] is None or not window.max_context[start]:
                continue
            if end < start or end - start + 1 > max_answer_length:
                continue
            s_logit, e_logit = float(window.start_logits[start]), float(window.end_logits[end])
            text = context[window.offsets[start][0]:window.offsets[end][1]]
            spans.append(Candidate(text, s_logit + e_logit, s_logit, e_logit))
    return spans


def decode(windows: list[Window], context: str, n_best: int = 20,
           max_answer_length: int = 30) -> tuple[list[Candidate], float]:
    """(the n-best distinct answer texts, best first; score_null - best_span) for one question."""
    spans = [span for window in windows for span in window_spans(window, context, n_best, max_answer_length)]
    spans.sort(key=lambda c: -c.score)
    seen, best = set(), []
    for span in spans:
        if span.text in seen:
            continue
        seen.add(span.text)
        best.append(span)
        if len(best) == n_best:
            break
    null = min(float(w.start_logits[w.null_index] + w.end_logits[w.null_index]) for w in windows)
    return best, (null - best[0].score) if best else NO_SPAN_ODDS


def answer(candidates: list[Candidate], null_odds: float, allow_null: bool, threshold: float) -> str:
    """The prediction: "" when null answers are allowed and `null_odds > threshold`, else the best span."""
    if not candidates or (allow_null and null_odds > threshold):
        return ""
    return candidates[0].text
