"""Reuse a fixed tokenizer (`pretrained:`), strictly offline: a tiktoken name from its cache, or files."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import tiktoken

from storage.stage import StageError

from .config import PRETRAINED_NAMES, TokenizerConfig
from .files import CONFIG_FILE, RANKS_FILE, Vocabulary, read_rank_file, read_vocabulary, with_specials

_BLOB = "https://openaipublic.blob.core.windows.net"
# The files tiktoken downloads for each name (tiktoken_ext/openai_public.py).
_NAME_FILES = {
    "gpt2": [f"{_BLOB}/gpt-2/encodings/main/vocab.bpe", f"{_BLOB}/gpt-2/encodings/main/encoder.json"],
    "r50k_base": [f"{_BLOB}/encodings/r50k_base.tiktoken"],
    "p50k_base": [f"{_BLOB}/encodings/p50k_base.tiktoken"],
    "cl100k_base": [f"{_BLOB}/encodings/cl100k_base.tiktoken"],
    "o200k_base": [f"{_BLOB}/encodings/o200k_base.tiktoken"],
}


def tiktoken_cache_dir() -> str:
    """Where tiktoken keeps downloaded files (same rule as `tiktoken.load.read_file_cached`)."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            return os.environ[variable]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _missing_from_cache(name: str) -> list[str]:
    cache = tiktoken_cache_dir()
    if cache == "":
        return list(_NAME_FILES[name])   # caching disabled: tiktoken would always download
    return [url for url in _NAME_FILES[name]
            if not os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))]


def load_named(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding by name, only if its files are cached; never touches the network."""
    missing = _missing_from_cache(name)
    if missing:
        raise StageError(
            f"tokenizer.pretrained={name!r} needs {', '.join(missing)}, which is not in the tiktoken cache "
            f"{tiktoken_cache_dir()!r}, and lmforge does not download at run time. On a machine with "
            f"internet run `python -c \"import tiktoken; tiktoken.get_encoding('{name}')\"`, copy its cache "
            f"directory here and set TIKTOKEN_CACHE_DIR, or set pretrained to a tokenizer directory or .tiktoken file.")
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # a corrupt cache file makes tiktoken try to download again
        raise StageError(f"tokenizer.pretrained={name!r}: the cached file in {tiktoken_cache_dir()!r} "
                         f"could not be loaded ({type(exc).__name__}: {exc})") from None


def pretrained_vocabulary(config: TokenizerConfig) -> Vocabulary:
    """The fixed vocabulary `config.pretrained` names, with the config's special tokens.

    Special tokens the source already has keep their ids; others get ids after the largest one.
    """
    spec = str(config.pretrained)
    if spec in PRETRAINED_NAMES:
        encoding = load_named(spec)
        # tiktoken has no public accessor for the ranks and pattern; these attributes are its own.
        return with_specials(encoding._mergeable_ranks, encoding._pat_str, config.special_tokens,
                             f"pretrained:{spec}", encoding._special_tokens)
    path = Path(spec).expanduser()
    if path.is_dir():
        source = read_vocabulary(path)
        return with_specials(source.ranks, source.pattern, config.special_tokens,
                             f"pretrained:{path}", source.special_tokens)
    if path.is_file():
        return with_specials(read_rank_file(path), config.pattern, config.special_tokens, f"pretrained:{path}")
    raise StageError(f"tokenizer.pretrained={spec!r} is neither a tiktoken name ({', '.join(PRETRAINED_NAMES)}) "
                     f"nor an existing tokenizer directory or {RANKS_FILE} file")


def external_inputs(config: TokenizerConfig) -> dict[str, Any]:
    """What the fingerprint must see besides the config: the content of a `pretrained` path."""
    if not config.pretrained or config.pretrained in PRETRAINED_NAMES:
        return {}
    path = Path(config.pretrained).expanduser()
    files = [path / RANKS_FILE, path / CONFIG_FILE] if path.is_dir() else [path]
    return {"pretrained_files": [[p.name, hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None]
                                 for p in files]}
