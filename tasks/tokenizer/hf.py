"""Export a vocabulary as a Hugging Face `tokenizer.json` that gives the same ids as tiktoken."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .files import Vocabulary


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which HF byte-level BPE uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _as_unicode(token: bytes) -> str:
    # latin-1 turns each byte into the code point of the same number; translate remaps those in C.
    return token.decode("latin-1").translate(byte_to_unicode())


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of a token into two tokens, ordered by the token's rank (then the pieces' ranks).

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; listing every pair
    that forms a token, in rank order, makes HF's merge-priority BPE pick the same merges.
    """
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


# An atom (\\p{..}, an escape, a [class] or a plain character) followed by a possessive interval.
_POSSESSIVE_INTERVAL = re.compile(r"(\\[pP]\{\w+\}|\\.|\[(?:\\.|[^\]\\])*\]|[^\\()\[\]|])(\{\d+(?:,\d*)?\})\+")


def onig_pattern(pattern: str) -> str:
    """The split pattern in Oniguruma's syntax, which HF `tokenizers` uses.

    tiktoken's regex engine reads `X{1,3}+` as possessive; Oniguruma (Ruby syntax) reads it as
    `(X{1,3})+`, so GPT-4's `\\p{N}{1,3}+` would swallow whole numbers. An atomic group says the same.
    """
    converted = _POSSESSIVE_INTERVAL.sub(r"(?>\1\2)", pattern)
    if re.search(r"\{\d+(?:,\d*)?\}\+", converted):
        raise ValueError(f"pattern {pattern!r}: a possessive {{n,m}}+ on a group cannot be exported to HF tokenizers")
    return converted


def onig_regex(pattern: str) -> Regex:
    """The split pattern compiled by HF `tokenizers`; a ValueError says why it cannot be."""
    converted = onig_pattern(pattern)
    try:
        return Regex(converted)
    except Exception as exc:   # tokenizers raises a bare Exception ("Oniguruma error: ...")
        raise ValueError(f"pattern {pattern!r} cannot be exported to HF tokenizers (Oniguruma): {exc}") from None


def hf_tokenizer(vocab: Vocabulary) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` with the same ranks, split pattern and special ids."""
    model_vocab = {_as_unicode(token): rank for token, rank in vocab.ranks.items()}
    clash = set(model_vocab) & set(vocab.special_tokens)
    if clash:
        raise ValueError(f"special tokens {sorted(clash)} are also ordinary tokens of the vocabulary")
    # Specials sit in the model's vocab so they keep their ids, even where a pretrained vocab has gaps.
    model_vocab.update(vocab.special_tokens)
    merges = [(_as_unicode(a), _as_unicode(b)) for a, b in merges_from_ranks(vocab.ranks)]
    # ignore_merges: a piece that is a whole token is taken as is, as tiktoken does.
    tokenizer = Tokenizer(models.BPE(vocab=model_vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(onig_regex(vocab.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False)
                                  for name in sorted(vocab.special_tokens, key=vocab.special_tokens.get)])
    return tokenizer


def write_hf_tokenizer(vocab: Vocabulary, path: Path) -> None:
    hf_tokenizer(vocab).save(str(path), pretty=False)
