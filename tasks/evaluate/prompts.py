"""Prompts as lm-evaluation-harness builds them: k-shot demonstrations, and the context/continuation token boundary.

A k-shot prompt is k demonstrations (an item's gold context + continuation), each followed by the
few-shot delimiter, then the scored item's context. Demonstrations are drawn per item with a seeded
generator keyed by the item's id (so a prompt does not depend on which other items are scored),
and never include the scored item: neither its id nor its context.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import tiktoken

from storage.sampling import unit_hash
from storage.stage import StageError
from tasks.datasets.multiple_choice import ChoiceItem

FEWSHOT_DELIMITER = "\n\n"     # the harness's default fewshot_delimiter


def draw_demonstrations(item: ChoiceItem, pool: Sequence[ChoiceItem], k: int, salt: str) -> list[ChoiceItem]:
    """k items of `pool` other than `item`, drawn by a generator seeded with (salt, item id)."""
    if k == 0:
        return []
    rng = random.Random(int(unit_hash(salt, item.id) * 2**53))
    allowed = lambda other: other.id != item.id and other.contexts != item.contexts  # noqa: E731
    # Like the harness, draw one spare in case the item itself is drawn; scan the pool only if that is not enough.
    drawn = [pool[i] for i in rng.sample(range(len(pool)), min(len(pool), k + 1)) if allowed(pool[i])]
    if len(drawn) < k:
        eligible = [other for other in pool if allowed(other)]
        if len(eligible) < k:
            raise StageError(f"num_fewshot={k} but the demonstration pool holds only {len(eligible)} items "
                             f"besides {item.id!r}")
        drawn = rng.sample(eligible, k)
    return drawn[:k]


def fewshot_prefix(demonstrations: Sequence[ChoiceItem], delimiter: str = FEWSHOT_DELIMITER) -> str:
    return "".join(demo.demonstration + delimiter for demo in demonstrations)


def encode_pairs(encoding: tiktoken.Encoding, pairs: Sequence[tuple[str, str]],
                 prefix_id: int) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per pair, as the harness's `loglikelihood` / `_encode_pair` make them.

    Trailing whitespace of the context moves to the continuation; the context and the joint text are
    encoded, and the continuation is the joint ids past the context's. An empty context becomes the
    prefix token (end-of-text), unless the continuation already starts with it. Plain text never
    becomes a special token (`encode_ordinary`).
    """
    moved = [_move_spaces(context, continuation) for context, continuation in pairs]
    contexts = sorted({context for context, _ in moved if context})
    context_ids = dict(zip(contexts, encoding.encode_ordinary_batch(contexts)))
    joint_ids = encoding.encode_ordinary_batch([context + continuation for context, continuation in moved])
    out = []
    for (context, _), joint in zip(moved, joint_ids):
        if not context:
            out.append(([prefix_id], joint) if joint[:1] != [prefix_id] else (joint[:1], joint[1:]))
        else:
            out.append((context_ids[context], joint[len(context_ids[context]):]))
    return out


def _move_spaces(context: str, continuation: str) -> tuple[str, str]:
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation
