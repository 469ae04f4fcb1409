"""SQuAD scoring exactly as the official v2.0 evaluation script (which agrees with v1.1 on v1.1 data).

Answers are normalised (lowercase, punctuation removed, a/an/the dropped, whitespace collapsed);
Exact Match and token F1 take the maximum over the gold answers; an unanswerable question's gold is
`""`, so an empty prediction scores 1. With `na_probs` (our `null_odds.json`), a question whose value
exceeds `na_prob_thresh` (the script's default 1.0) counts as answered "no answer", and `best_exact`
/ `best_f1` report the threshold that would have been best on this very set (tuned on it, as named).
Values are percentages, as the script prints them.
"""
from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

from tasks.datasets.squad import SquadExample

ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
PUNCTUATION = frozenset(string.punctuation)
OFFICIAL_NA_PROB_THRESH = 1.0


def normalize_answer(text: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def get_tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def compute_exact(gold: str, prediction: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(prediction))


def compute_f1(gold: str, prediction: str) -> float:
    gold_tokens, pred_tokens = get_tokens(gold), get_tokens(prediction)
    if not gold_tokens or not pred_tokens:          # no-answer: 1 if both are empty, else 0
        return float(gold_tokens == pred_tokens)
    common = collections.Counter(gold_tokens) & collections.Counter(pred_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_answers(example: SquadExample) -> list[str]:
    """The gold texts that survive normalisation, or `[""]` for an unanswerable question."""
    return [a.text for a in example.answers if normalize_answer(a.text)] or [""]


def raw_scores(examples: Sequence[SquadExample], predictions: Mapping[str, str]) -> tuple[dict, dict]:
    """Per question: the best exact and F1 over its gold answers (questions without a prediction are left out)."""
    exact, f1 = {}, {}
    for example in examples:
        if example.id not in predictions:
            continue
        golds, prediction = gold_answers(example), predictions[example.id]
        exact[example.id] = max(compute_exact(g, prediction) for g in golds)
        f1[example.id] = max(compute_f1(g, prediction) for g in golds)
    return exact, f1


def apply_no_answer_threshold(scores: dict[str, float], na_probs: Mapping[str, float], has_answer: dict[str, bool],
                              threshold: float) -> dict[str, float]:
    return {qid: float(not has_answer[qid]) if na_probs[qid] > threshold else score for qid, score in scores.items()}


def _mean(scores: dict[str, float], ids: Sequence[str]) -> float:
    return 100.0 * sum(scores[q] for q in ids) / len(ids)


def best_threshold(predictions: Mapping[str, str], scores: dict[str, float], na_probs: Mapping[str, float],
                   has_answer: dict[str, bool]) -> tuple[float, float]:
    """The script's `find_best_thresh`: the best score over thresholds at the observed na_probs."""
    current = best = sum(1 for qid in has_answer if not has_answer[qid])
    threshold = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            current += scores[qid]
        else:
            current += -1 if predictions[qid] else 0
        if current > best:
            best, threshold = current, na_probs[qid]
    return 100.0 * best / len(scores), threshold


def squad_scores(examples: Sequence[SquadExample], predictions: Mapping[str, str],
                 na_probs: Mapping[str, float] | None = None,
                 na_prob_thresh: float = OFFICIAL_NA_PROB_THRESH) -> dict[str, float]:
    """The official script's output dict: exact, f1, total, HasAns_*/NoAns_*, and best_* with na_probs."""
    has_answer = {e.id: bool(e.answers) for e in examples}
    probs = na_probs if na_probs is not None else {qid: 0.0 for qid in predictions}
    exact_raw, f1_raw = raw_scores(examples, predictions)
    exact = apply_no_answer_threshold(exact_raw, probs, has_answer, na_prob_thresh)
    f1 = apply_no_answer_threshold(f1_raw, probs, has_answer, na_prob_thresh)
    ids = list(exact)
    if not ids:
        raise ValueError("no question of the evaluation set has a prediction")
    out = {"exact": _mean(exact, ids), "f1": _mean(f1, ids), "total": float(len(ids))}
    subsets = (("HasAns", [q for q in ids if has_answer[q]]), ("NoAns", [q for q in ids if not has_answer[q]]))
    for name, subset in subsets:
        if subset:
            out.update({f"{name}_exact": _mean(exact, subset), f"{name}_f1": _mean(f1, subset),
                        f"{name}_total": float(len(subset))})
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = best_threshold(predictions, exact_raw, na_probs, has_answer)
        out["best_f1"], out["best_f1_thresh"] = best_threshold(predictions, f1_raw, na_probs, has_answer)
    return out
