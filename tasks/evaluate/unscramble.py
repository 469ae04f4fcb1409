"""Word unscrambling (GPT-3's anagram task, "chiar = chair"): generative k-shot scored by exact match.

The words are the `VOCABULARY` most frequent lower-case words of 4 to 8 letters in a text file. Each
keeps its first and last letter and has the letters between shuffled (never left as they were), by
a generator seeded with (seed, word). The item order is a seeded shuffle; a recipe's `limit` scores
the first items, and demonstrations come from the whole list, never the scored word. An item is
one line `chiar =`, its answer ` chair`; demonstrations are `chiar = chair` lines.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

from storage.sampling import unit_hash
from storage.stage import StageError
from tasks.datasets.multiple_choice import ChoiceItem

WORD = re.compile(r"(?<![\w'’-])[a-z]{4,8}(?![\w'’-])")
VOCABULARY = 2000
DELIMITER = "\n"          # between demonstrations; generation stops at the first newline


def scramble(word: str, seed: int) -> str:
    """The word with its inner letters shuffled into a different order (first and last kept)."""
    inner = list(word[1:-1])
    if len(set(inner)) < 2:
        raise ValueError(f"{word!r} has no second inner letter to swap")
    rng = random.Random(int(unit_hash(f"evaluate-unscramble:{seed}", word) * 2**53))
    shuffled = inner[:]
    while shuffled == inner:
        rng.shuffle(shuffled)
    return word[0] + "".join(shuffled) + word[-1]


def unscramble_items(path: Path | str, seed: int) -> list[ChoiceItem]:
    """The task's items in their seeded order; a file without such words is refused, naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StageError(f"{path}: file not found (unscramble draws its words from it)") from None
    except UnicodeDecodeError as err:
        raise StageError(f"{path}: not UTF-8 ({err})") from None
    counts = Counter(WORD.findall(text))
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(set(w[1:-1])) > 1]
    words = words[:VOCABULARY]
    if not words:
        raise StageError(f"{path}: no lower-case words of 4 to 8 letters to scramble")
    random.Random(int(unit_hash("evaluate-unscramble-order", str(seed)) * 2**53)).shuffle(words)
    return [_item(word, seed, number) for number, word in enumerate(words, start=1)]


def _item(word: str, seed: int, number: int) -> ChoiceItem:
    prompt = f"{scramble(word, seed)} ="
    return ChoiceItem(id=word, line=number, contexts=(prompt,), continuations=(f" {word}",), label=0,
                      choices=(word,))


def answer(generated: str) -> str:
    """What the model answered: its text up to the first newline, stripped."""
    return generated.split("\n", 1)[0].strip()
