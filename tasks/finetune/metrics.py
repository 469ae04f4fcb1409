"""Classification and regression metrics, written out from their definitions (no torch, no sklearn).

Each is checked against scikit-learn/scipy in the tests. Values are fractions (0..1), as the HF
`evaluate` GLUE metric reports them; the GLUE table shows them x100, as the BERT paper does.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence


def accuracy(predictions: Sequence[Hashable], golds: Sequence[Hashable]) -> float:
    _same_length(predictions, golds)
    return sum(p == g for p, g in zip(predictions, golds)) / len(golds)


def f1_binary(predictions: Sequence[Hashable], golds: Sequence[Hashable], positive: Hashable = 1) -> float:
    """F1 of the positive class: 2 tp / (2 tp + fp + fn); 0 when there is no positive anywhere."""
    _same_length(predictions, golds)
    tp = sum(p == positive and g == positive for p, g in zip(predictions, golds))
    fp = sum(p == positive and g != positive for p, g in zip(predictions, golds))
    fn = sum(p != positive and g == positive for p, g in zip(predictions, golds))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def f1_per_class(predictions: Sequence[Hashable], golds: Sequence[Hashable]) -> dict[Hashable, float]:
    """F1 of each class that occurs in the gold labels or the predictions."""
    return {label: f1_binary(predictions, golds, positive=label) for label in sorted(set(golds) | set(predictions),
                                                                                   key=str)}


def f1_macro(predictions: Sequence[Hashable], golds: Sequence[Hashable]) -> float:
    """The unweighted mean of the per-class F1 (sklearn's average='macro')."""
    scores = f1_per_class(predictions, golds)
    return sum(scores.values()) / len(scores)


def f1_weighted(predictions: Sequence[Hashable], golds: Sequence[Hashable]) -> float:
    """Per-class F1 weighted by each class's share of the gold labels (sklearn's average='weighted')."""
    scores, support = f1_per_class(predictions, golds), Counter(golds)
    return sum(scores[label] * count for label, count in support.items()) / len(golds)


def matthews_corrcoef(predictions: Sequence[Hashable], golds: Sequence[Hashable]) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K); 0 when it is undefined."""
    _same_length(predictions, golds)
    n = len(golds)
    correct = sum(p == g for p, g in zip(predictions, golds))
    pred_counts, gold_counts = Counter(predictions), Counter(golds)
    labels = set(pred_counts) | set(gold_counts)
    products = sum(pred_counts[k] * gold_counts[k] for k in labels)
    numerator = correct * n - products
    denominator = math.sqrt(n * n - sum(c * c for c in pred_counts.values())) * \
        math.sqrt(n * n - sum(c * c for c in gold_counts.values()))
    return numerator / denominator if denominator else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; 0 when either side is constant."""
    _same_length(x, y)
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    dx, dy = [v - mean_x for v in x], [v - mean_y for v in y]
    denominator = math.sqrt(sum(v * v for v in dx) * sum(v * v for v in dy))
    return sum(a * b for a, b in zip(dx, dy)) / denominator if denominator else 0.0


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span (scipy's rankdata 'average')."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearmanr(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the tie-averaged ranks."""
    return pearson(ranks(x), ranks(y))


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b) or not a:
        raise ValueError(f"{len(a)} predictions for {len(b)} gold labels (need the same number, at least one)")
