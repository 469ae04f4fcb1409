"""Entity-level precision, recall and F1 as the CoNLL shared task's `conlleval` script computes them.

An entity (chunk) is a maximal run of tags of one type; `B-X` always starts one, `I-X` starts one
after `O` or a different type (so IOB1 and IOB2 read alike). A predicted entity counts only when its
type, start and end all equal a gold entity's. Values are fractions (conlleval prints percent).
"""
from __future__ import annotations

from collections.abc import Sequence


def _split(tag: str) -> tuple[str, str]:
    """('B'|'I'|'O', type)."""
    return ("O", "") if tag == "O" else (tag[0], tag[2:])


def chunk_ends(previous: str, tag: str) -> bool:
    """True when a chunk ended at the token before `tag` (conlleval's endOfChunk)."""
    (prev_kind, prev_type), (kind, type_) = _split(previous), _split(tag)
    if prev_kind == "O":
        return False
    return kind in ("O", "B") or prev_type != type_


def chunk_starts(previous: str, tag: str) -> bool:
    """True when a chunk starts at `tag` (conlleval's startOfChunk)."""
    (prev_kind, prev_type), (kind, type_) = _split(previous), _split(tag)
    if kind == "O":
        return False
    return kind == "B" or prev_kind == "O" or prev_type != type_


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first index, last index) of every chunk in one sentence."""
    found, start, previous = set(), None, "O"
    for index, tag in enumerate([*tags, "O"]):
        if start is not None and chunk_ends(previous, tag):
            found.add((_split(previous)[1], start, index - 1))
            start = None
        if chunk_starts(previous, tag):
            start = index
        previous = tag
    return found


def conll_scores(predictions: Sequence[Sequence[str]], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """f1, precision, recall over entities, and token accuracy, summed over all sentences."""
    if len(predictions) != len(golds) or not golds:
        raise ValueError(f"{len(predictions)} predicted sentences for {len(golds)} gold ones")
    correct = predicted = gold = tokens = right_tokens = 0
    for pred, true in zip(predictions, golds):
        if len(pred) != len(true):
            raise ValueError(f"a sentence has {len(pred)} predicted tags for {len(true)} tokens")
        pred_entities, gold_entities = entities(pred), entities(true)
        correct += len(pred_entities & gold_entities)
        predicted, gold = predicted + len(pred_entities), gold + len(gold_entities)
        tokens, right_tokens = tokens + len(true), right_tokens + sum(p == t for p, t in zip(pred, true))
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "accuracy": right_tokens / tokens}
