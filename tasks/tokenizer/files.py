"""The tokenizer's files: a tiktoken rank file plus `tokenizer_config.json`, loadable offline."""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path

import tiktoken

from storage.formats import TokenizerFile
from storage.stage import StageError

from .config import BYTE_TOKENS

RANKS_FILE = "tokenizer.tiktoken"
CONFIG_FILE = "tokenizer_config.json"
HF_FILE = "tokenizer.json"


def pattern_problem(pattern: str) -> str | None:
    """Why tiktoken cannot compile `pattern` as a split regex, or None."""
    try:
        tiktoken.Encoding("check", pat_str=pattern, special_tokens={},
                          mergeable_ranks={bytes([b]): b for b in range(BYTE_TOKENS)})
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Vocabulary:
    """A byte-level BPE: mergeable ranks (token bytes -> id), the split pattern, special token ids."""

    ranks: dict[bytes, int]
    pattern: str
    special_tokens: dict[str, int]
    origin: str = "rustbpe"

    @property
    def vocab_size(self) -> int:
        """Ids run from 0 to vocab_size - 1 (a pretrained vocabulary may leave gaps)."""
        return max([*self.ranks.values(), *self.special_tokens.values()]) + 1

    def encoding(self, name: str = "lmforge") -> tiktoken.Encoding:
        return tiktoken.Encoding(name, pat_str=self.pattern, mergeable_ranks=self.ranks,
                                 special_tokens=self.special_tokens)


def with_specials(ranks: dict[bytes, int], pattern: str, specials: list[str], origin: str,
                  known: dict[str, int] | None = None) -> Vocabulary:
    """A vocabulary whose special tokens keep the ids in `known` and take fresh ids after the rest."""
    known = known or {}
    next_id = max([*ranks.values(), *known.values()]) + 1
    ids: dict[str, int] = {}
    for name in specials:
        if name in known:
            ids[name] = known[name]
        else:
            ids[name], next_id = next_id, next_id + 1
    return Vocabulary(ranks, pattern, ids, origin)


def write_rank_file(ranks: dict[bytes, int], path: Path) -> None:
    """tiktoken's format: base64 token, space, rank; one per line, by rank."""
    lines = [base64.b64encode(token) + b" " + str(rank).encode() for token, rank in
             sorted(ranks.items(), key=lambda item: item[1])]
    Path(path).write_bytes(b"\n".join(lines) + b"\n")


def read_rank_file(path: Path) -> dict[bytes, int]:
    """Parses a tiktoken rank file; a malformed line is a StageError naming the file and line."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            token = base64.b64decode(token_b64, validate=True)
            ranks[token] = int(rank)
        except (ValueError, binascii.Error):
            raise StageError(f"{path}:{number}: expected '<base64 token> <rank>', got {line[:80]!r}") from None
    if not ranks:
        raise StageError(f"{path}: no ranks in the file")
    if len(set(ranks.values())) != len(ranks):
        raise StageError(f"{path}: two tokens share a rank")
    missing = [b for b in range(BYTE_TOKENS) if bytes([b]) not in ranks]
    if missing:   # tiktoken would panic ("no entry found for key") on the first text holding one
        shown = ", ".join(f"0x{b:02x}" for b in missing[:8]) + (", ..." if len(missing) > 8 else "")
        raise StageError(f"{path}: {len(missing)} of the {BYTE_TOKENS} single-byte tokens have no rank ({shown}); "
                         "a byte-level BPE rank file must hold every byte")
    return ranks


def save_vocabulary(vocab: Vocabulary, directory: Path) -> None:
    """Writes the rank file and `tokenizer_config.json` (the HF export is `hf.write_hf_tokenizer`)."""
    write_rank_file(vocab.ranks, Path(directory) / RANKS_FILE)
    TokenizerFile(pattern=vocab.pattern, special_tokens=vocab.special_tokens, vocab_size=vocab.vocab_size,
                  n_ranks=len(vocab.ranks), origin=vocab.origin).write(Path(directory) / CONFIG_FILE)


def read_vocabulary(directory: Path) -> Vocabulary:
    """Reads a directory written by `save_vocabulary`, checking the two files agree."""
    directory = Path(directory)
    ranks_path = directory / RANKS_FILE
    missing = f"{ranks_path}: missing; a tokenizer directory holds {RANKS_FILE} and {CONFIG_FILE}"
    if not ranks_path.is_file() and (directory / HF_FILE).is_file():   # its tokenizer_config.json is HF's own
        raise StageError(f"{missing}; {directory} looks like a Hugging Face tokenizer folder ({HF_FILE}), which "
                         f"is not read: give a tiktoken name, a {RANKS_FILE} rank file or a tokenizer stage output")
    config = _read_config(directory / CONFIG_FILE)
    if not ranks_path.is_file():
        raise StageError(missing)
    ranks = read_rank_file(ranks_path)
    problem = pattern_problem(config.pattern)
    if problem:
        raise StageError(f"{directory / CONFIG_FILE}: field 'pattern' is not a valid split regex ({problem})")
    vocab = Vocabulary(ranks, config.pattern, dict(config.special_tokens), config.origin)
    if config.n_ranks != len(ranks):
        raise StageError(f"{directory / CONFIG_FILE}: field 'n_ranks' is {config.n_ranks} but {RANKS_FILE} "
                         f"holds {len(ranks)} ranks")
    if vocab.vocab_size != config.vocab_size:
        raise StageError(f"{directory / CONFIG_FILE}: field 'vocab_size' is {config.vocab_size} but the ranks and "
                         f"special tokens need {vocab.vocab_size}")
    clash = set(vocab.special_tokens.values()) & set(ranks.values())
    if clash:
        raise StageError(f"{directory / CONFIG_FILE}: special token ids {sorted(clash)[:5]} are also ranks")
    return vocab


def _read_config(path: Path) -> TokenizerFile:
    if not path.is_file():
        raise StageError(f"{path}: missing; a tokenizer directory holds {RANKS_FILE} and {CONFIG_FILE}")
    return TokenizerFile.read(path)   # a FileFormatError (a StageError) names the file and the field


def load_encoding(tokenizer_dir: Path) -> tiktoken.Encoding:
    """The tokenizer stage's output as a `tiktoken.Encoding`, with no network access."""
    tokenizer_dir = Path(tokenizer_dir)
    return read_vocabulary(tokenizer_dir).encoding(f"lmforge:{tokenizer_dir.name}")
