"""Predictions against gold labels: the task's metrics (official first) and the rows they come from.

Every number here can be recomputed from `predictions.jsonl` (and, for SQuAD, from the official
`predictions.json` + `null_odds.json` with the official script, `--na-prob-thresh` the task's null_threshold).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from storage.formats import PredictionRow
from tasks.finetune import metrics as m
from tasks.finetune.conlleval import conll_scores
from tasks.finetune.data import TaskData
from tasks.finetune.predict import Predictions
from tasks.finetune.squad_eval import squad_scores

CLASSIFICATION = {"accuracy": m.accuracy, "matthews_corrcoef": m.matthews_corrcoef, "f1_macro": m.f1_macro,
                  "f1_weighted": m.f1_weighted, "pearson": m.pearson, "spearmanr": m.spearmanr}


def gold_of(data: TaskData, example: Any) -> Any:
    if data.form == "qa":
        return [a.text for a in example.answers]
    if data.form == "tagging":
        return list(example.tags)
    return example.label


def prediction_rows(data: TaskData, examples: list[Any], predictions: Predictions) -> list[PredictionRow]:
    return [PredictionRow(id=e.id, prediction=p, gold=gold_of(data, e)) for e, p in zip(examples, predictions.values)]


def score(data: TaskData, examples: list[Any], predictions: Predictions,
          null_threshold: float = 0.0) -> dict[str, float]:
    """The task's metrics, its official metric(s) first.

    SQuAD v2: `null_threshold` is the one the answers were decoded with (`nbest.answer`); the script's
    no-answer threshold is set to it, so exact/f1 are those of the answers in predictions.json (a
    question whose null_odds exceed it already answers "") and the official script reproduces them
    with `--na-prob-file null_odds.json --na-prob-thresh <null_threshold>`, or from predictions.json alone.
    """
    if data.form == "qa":
        answers = {e.id: p for e, p in zip(examples, predictions.values)}
        if not data.allow_null:            # v1.1: no null answers, no odds
            return _ordered(squad_scores(examples, answers), data.metrics)
        odds = {e.id: o for e, o in zip(examples, predictions.null_odds)}
        return _ordered(squad_scores(examples, answers, odds, na_prob_thresh=null_threshold), data.metrics)
    golds = [gold_of(data, e) for e in examples]
    if data.form == "tagging":
        return _ordered(conll_scores(predictions.values, golds), data.metrics)
    values = {name: _metric(name, predictions.values, golds, data) for name in data.metrics}
    return _ordered({**values, **_extra(predictions.values, golds, data)}, data.metrics)


def _metric(name: str, predictions: list[Any], golds: list[Any], data: TaskData) -> float:
    if name == "f1":                           # MRPC/QQP: F1 of the positive class (label 1)
        return m.f1_binary(predictions, golds, positive=data.labels[-1])
    return CLASSIFICATION[name](predictions, golds)


def _extra(predictions: list[Any], golds: list[Any], data: TaskData) -> dict[str, float]:
    """Beside the official metrics: accuracy for any classifier, per-class F1 for multi-class tasks."""
    if data.regression:
        return {}
    extra = {"accuracy": m.accuracy(predictions, golds)}
    if len(data.labels) > 2 and data.kind in ("phrasebank", "fomc"):
        extra.update({f"f1/{label}": value for label, value in m.f1_per_class(predictions, golds).items()})
    return extra


def _ordered(values: dict[str, float], official: tuple[str, ...]) -> dict[str, float]:
    first = {name: float(values[name]) for name in official if name in values}
    return {**first, **{k: float(v) for k, v in values.items() if k not in first}}


def sentiment_index(ids: list[str], predictions: list[str], golds: list[str],
                    groups: list[str | None]) -> dict[str, Any]:
    """FOMC's (dovish - hawkish) / (dovish + hawkish) over the predicted (and the gold) labels, overall and per
    year; each year lists its example ids, so the index can be recomputed from predictions.jsonl."""
    by_group: dict[str, dict[str, Any]] = {}
    for key in sorted({g for g in groups if g is not None}):
        chosen = [i for i, g in enumerate(groups) if g == key]
        by_group[key] = {**_index([predictions[i] for i in chosen], [golds[i] for i in chosen]),
                         "ids": [ids[i] for i in chosen]}
    return {"formula": "(dovish - hawkish) / (dovish + hawkish); null where a set has neither",
            "overall": _index(predictions, golds), "by_year": by_group}


def _index(predictions: list[str], golds: list[str]) -> dict[str, Any]:
    def value(counts: Counter) -> float | None:
        total = counts["dovish"] + counts["hawkish"]
        return (counts["dovish"] - counts["hawkish"]) / total if total else None

    predicted, gold = Counter(predictions), Counter(golds)
    return {"n": len(predictions), "predicted": dict(sorted(predicted.items())), "gold": dict(sorted(gold.items())),
            "index": value(predicted), "gold_index": value(gold)}
