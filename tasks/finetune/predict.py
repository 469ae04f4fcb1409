"""The fine-tuned model on the evaluation features, decoded into one prediction per evaluation example.

Batches go longest first (little padding); decoding follows the head: a label, a score, an answer
text (n-best over every window of a question, `tasks.finetune.nbest`), or one tag per word (its
first piece's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tasks.finetune import nbest
from tasks.finetune.data import TaskData
from tasks.finetune.model import TaskModel
from tasks.finetune.prepare import Prepared
from tasks.training.runtime import autocast


@dataclass
class Predictions:
    """Per evaluation example, in the order of `Prepared.examples`."""

    values: list[Any]
    null_odds: list[float] | None = None       # SQuAD: score_null - best_span
    nbest: list[list[dict]] | None = None


@torch.no_grad()
def feature_logits(model: TaskModel, prepared: Prepared, batch_size: int, device: torch.device,
                   precision: str) -> list[np.ndarray]:
    """The head's output for each feature (per-token outputs cut to the feature's length)."""
    features, pad = prepared.features, model.head_spec.pad_id
    longest = features.lengths.reshape(len(features), features.n_seq).max(axis=1)
    order = np.argsort(-longest, kind="stable")
    out: list[np.ndarray | None] = [None] * len(features)
    per_token = model.head_spec.kind in ("span", "tag")
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        arrays = features.batch(indices, pad)
        arrays.pop("labels")
        inputs = {k: torch.as_tensor(v, device=device) for k, v in arrays.items()}
        with autocast(device, precision):
            logits = model(**inputs).logits.float().cpu().numpy()
        for row, index in enumerate(indices):
            out[index] = logits[row, : longest[index]] if per_token else logits[row]
    return out


def decode(data: TaskData, prepared: Prepared, logits: list[np.ndarray], n_best: int = 20,
           max_answer_length: int = 30, null_threshold: float = 0.0) -> Predictions:
    if data.form == "qa":
        return _answers(data, prepared, logits, n_best, max_answer_length, null_threshold)
    if data.form == "tagging":
        return _tags(data, prepared, logits)
    if data.regression:
        return Predictions([float(value[0]) for value in logits])
    return Predictions([data.labels[int(np.argmax(value))] for value in logits])


def _answers(data: TaskData, prepared: Prepared, logits: list[np.ndarray], n_best: int, max_answer_length: int,
             null_threshold: float) -> Predictions:
    windows: list[list[nbest.Window]] = [[] for _ in prepared.examples]
    for meta, values in zip(prepared.meta, logits):
        windows[meta.example].append(nbest.Window(values[:, 0], values[:, 1], meta.offsets, meta.max_context,
                                                  meta.null_index))
    texts, odds, lists = [], [], []
    for example, example_windows in zip(prepared.examples, windows):
        candidates, null_odds = nbest.decode(example_windows, example.context, n_best, max_answer_length)
        texts.append(nbest.answer(candidates, null_odds, data.allow_null, null_threshold))
        odds.append(null_odds)
        lists.append([{"text": c.text, "score": c.score} for c in candidates])
    return Predictions(texts, odds, lists)


def _tags(data: TaskData, prepared: Prepared, logits: list[np.ndarray]) -> Predictions:
    tags = [["O"] * len(sentence.tokens) for sentence in prepared.examples]
    for meta, values in zip(prepared.meta, logits):
        for word, position in enumerate(meta.positions):
            tags[meta.example][meta.first_word + word] = data.labels[int(np.argmax(values[position]))]
    return Predictions(tags)
