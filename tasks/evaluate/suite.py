"""One task scored end to end: prompts, log-likelihoods or generations, predictions and metrics.

Metrics, as lm-evaluation-harness defines them:

    choice   (arc, piqa, hellaswag, swag)  acc = argmax of the summed log-likelihoods is the gold;
                                           acc_norm = the same after dividing by the choice's length
                                           in characters (the choice without the target delimiter)
    schema   (winogrande)                  acc over the partial scores (one continuation, two contexts)
    cloze    (lambada)                     acc = the target is the greedy decode; ppl = exp(-mean ll)
    generate (unscramble)                  exact_match of the greedy answer (up to a newline)

Every task also reports `centered = (official - chance) / (1 - chance)` (DCLM's CORE), chance being
the mean of 1/choices (0 for cloze and generation).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import tiktoken

from storage.formats import PredictionRow
from tasks.datasets.multiple_choice import ChoiceItem
from tasks.evaluate import unscramble
from tasks.evaluate.config import TaskSpec
from tasks.evaluate.prompts import FEWSHOT_DELIMITER, draw_demonstrations, encode_pairs, fewshot_prefix
from tasks.evaluate.scoring import Score, Scorer, request_window

OFFICIAL = {"choice": "acc_norm", "schema": "acc", "cloze": "acc", "generate": "exact_match"}
MAX_NEW_TOKENS = 16            # generation budget of an answer (a word of up to 8 letters)
EOT = "<|endoftext|>"


@dataclass
class TaskResult:
    metrics: dict[str, float]                 # the official metric first
    rows: list[PredictionRow]
    dropped: Counter = field(default_factory=Counter)    # items left out while scoring, by reason

    @property
    def examples(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class LM:
    """A causal LM ready to score: the scorer and the tokenizer it was trained with."""

    scorer: Scorer
    encoding: tiktoken.Encoding

    @property
    def eot(self) -> int:
        return self.scorer.spec.special_tokens[EOT]


# ---- log-likelihood tasks -------------------------------------------------------------------


@dataclass(frozen=True)
class Prompted:
    """An item with its k-shot prefix in front of every context, and the token ids of each pair."""

    item: ChoiceItem
    contexts: tuple[str, ...]
    encoded: tuple[tuple[list[int], list[int]], ...]


def score_loglikelihood_task(task: TaskSpec, items: Sequence[ChoiceItem], pool: Sequence[ChoiceItem], lm: LM,
                             seed: int) -> TaskResult:
    """Scores the first `task.limit` items whose continuations fit the model's window."""
    prompted, dropped = _prompted_items(task, items, pool, lm, seed)
    seq_len = lm.scorer.spec.seq_len
    windows = [request_window(ctx, cont, seq_len) for p in prompted for ctx, cont in p.encoded]
    scores = iter(lm.scorer.score(windows))
    rows = [_row(task, p, [next(scores) for _ in p.encoded], lm.encoding) for p in prompted]
    metrics = task_metrics(task.kind, rows, [p.item.choices for p in prompted]) if rows else {}
    return TaskResult(metrics, rows, dropped)


def _prompted_items(task: TaskSpec, items: Sequence[ChoiceItem], pool: Sequence[ChoiceItem], lm: LM,
                    seed: int) -> tuple[list[Prompted], Counter]:
    """Prompts for items in file order until `limit` fit; a continuation longer than the window is dropped."""
    wanted = task.limit or len(items)
    kept, dropped, position = [], Counter(), 0
    while len(kept) < wanted and position < len(items):
        block = items[position: position + wanted - len(kept)]
        position += len(block)
        for prompted in _prompt_block(task, block, pool, lm, seed):
            if max(len(cont) for _, cont in prompted.encoded) > lm.scorer.spec.seq_len:
                dropped["continuation_exceeds_window"] += 1
            else:
                kept.append(prompted)
    return kept, dropped


def _prompt_block(task: TaskSpec, block: Sequence[ChoiceItem], pool: Sequence[ChoiceItem], lm: LM,
                  seed: int) -> list[Prompted]:
    salt = f"evaluate-fewshot:{seed}:{task.name}"
    contexts = []
    for item in block:
        prefix = fewshot_prefix(draw_demonstrations(item, pool, task.num_fewshot, salt))
        contexts.append(tuple(prefix + context for context in item.contexts))
    pairs = [pair for item, ctxs in zip(block, contexts) for pair in zip(ctxs, item.continuations)]
    encoded = iter(encode_pairs(lm.encoding, pairs, lm.eot))
    return [Prompted(item, ctxs, tuple(next(encoded) for _ in ctxs)) for item, ctxs in zip(block, contexts)]


def _argmax(values: Sequence[float]) -> int:
    """The first index of the largest value (numpy's argmax, which the harness uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _row(task: TaskSpec, prompted: Prompted, scores: list[Score], encoding: tiktoken.Encoding) -> PredictionRow:
    item, lls = prompted.item, [score.logprob for score in scores]
    shared = len(set(prompted.contexts)) == 1
    if task.kind == "cloze":
        prediction: object = encoding.decode(list(scores[0].argmax), errors="replace")
        gold: object = item.continuations[0]
    else:
        prediction, gold = _argmax(lls), item.label
    return PredictionRow(id=item.id, prediction=prediction, gold=gold,
                         context=prompted.contexts[0] if shared else list(prompted.contexts),
                         continuations=list(item.continuations), loglikelihoods=lls,
                         greedy=[score.greedy for score in scores])


def task_metrics(kind: str, rows: Sequence[PredictionRow], choices: Sequence[Sequence[str]]) -> dict[str, float]:
    """The task's metrics from its prediction rows (and, for acc_norm, each item's choice texts)."""
    n = len(rows)
    if kind == "generate":
        return _with_centering(kind, {"exact_match": sum(r.prediction == r.gold for r in rows) / n}, 0.0, n)
    if kind == "cloze":
        found = {"acc": sum(r.greedy[0] for r in rows) / n,
                 "ppl": math.exp(-sum(r.loglikelihoods[0] for r in rows) / n)}
        return _with_centering(kind, found, 0.0, n)
    found = {"acc": sum(_argmax(r.loglikelihoods) == r.gold for r in rows) / n}
    if kind == "choice":
        normed = [_argmax([ll / len(c) for ll, c in zip(r.loglikelihoods, texts)]) for r, texts in zip(rows, choices)]
        found["acc_norm"] = sum(pred == r.gold for pred, r in zip(normed, rows)) / n
    return _with_centering(kind, found, sum(1 / len(r.loglikelihoods) for r in rows) / n, n)


def _with_centering(kind: str, found: dict[str, float], chance: float, n: int) -> dict[str, float]:
    official = OFFICIAL[kind]
    ordered = {official: found[official], **{k: v for k, v in found.items() if k != official}}
    return {**ordered, "centered": (found[official] - chance) / (1 - chance), "chance": chance, "examples": float(n)}


# ---- generation ------------------------------------------------------------------------------


def score_generate_task(task: TaskSpec, items: Sequence[ChoiceItem], lm: LM, seed: int) -> TaskResult:
    """Greedy answers after k demonstration lines, cut at the first newline, compared exactly."""
    scored = list(items[: task.limit or len(items)])
    salt = f"evaluate-fewshot:{seed}:{task.name}"
    prompts = [fewshot_prefix(draw_demonstrations(item, items, task.num_fewshot, salt), unscramble.DELIMITER)
               + item.contexts[0] for item in scored]
    ids = lm.encoding.encode_ordinary_batch(prompts)
    generated = lm.scorer.greedy_continuations(ids, MAX_NEW_TOKENS)
    rows = [PredictionRow(id=item.id, prediction=unscramble.answer(_decode(lm, out)), gold=item.choices[0],
                          context=prompt) for item, prompt, out in zip(scored, prompts, generated)]
    return TaskResult(task_metrics(task.kind, rows, []), rows)


def _decode(lm: LM, ids: list[int]) -> str:
    """The generated text, up to an end-of-text token."""
    if lm.eot in ids:
        ids = ids[: ids.index(lm.eot)]
    return lm.encoding.decode(ids, errors="replace")


__all__ = ["FEWSHOT_DELIMITER", "LM", "OFFICIAL", "TaskResult", "score_generate_task", "score_loglikelihood_task",
           "task_metrics"]
