"""Evaluation sets for decontamination: their texts, and the n-gram hash index datatrove's filter reads.

The texts come from the dataset loaders the fine-tuning stage uses (`tasks.datasets`): a GLUE `.tsv`
(task from its folder name) gives each example's sentences, a SQuAD `.json` its contexts, questions
and answers. datatrove's `NGramsDecontIndexer` loads tasks through lighteval (and the network); here
the index is built from the files the recipe names, with the same normalization, tokenizer and hash
as datatrove's `NGramsDecontFilter`, in its format (`<eval set>.index.hashes`, one uint64 per n-gram).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from datatrove.pipeline.decont.n_grams import NGramsDecontConfig
from datatrove.utils.hashing import create_hash_func
from datatrove.utils.text import ngrams, simplify_text
from datatrove.utils.word_tokenizers import load_word_tokenizer

from storage.stage import StageError
from tasks.datasets import DatasetError, iter_glue, iter_squad

UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.\-]+")


def eval_set_name(path: Path) -> str:
    """`<folder>-<stem>`, e.g. `sst2-dev`, `squad-dev-v2.0-subset`: the name in stats and metadata."""
    return UNSAFE_NAME.sub("_", f"{path.parent.name}-{path.stem}")


def eval_texts(path: Path) -> list[str]:
    """Every distinct non-blank text of a GLUE `.tsv` or SQuAD `.json` file, in file order."""
    if not path.is_file():
        raise StageError(f"decontaminate.eval_sets: file not found: {path}")
    if path.suffix not in (".tsv", ".json"):
        raise StageError(f"decontaminate.eval_sets: {path}: unsupported file type (GLUE .tsv or SQuAD .json)")
    examples = iter_glue(path) if path.suffix == ".tsv" else iter_squad(path)
    try:
        # a dict keeps order and drops repeats (SQuAD repeats a context for each of its questions)
        return list(dict.fromkeys(text for example in examples for text in example.texts() if text.strip()))
    except DatasetError as err:
        raise StageError(f"decontaminate.eval_sets: {err}") from None


def decont_config(n_gram: int) -> NGramsDecontConfig:
    return NGramsDecontConfig(n_grams=n_gram)


def ngram_hashes(texts: list[str], n_gram: int, language: str) -> np.ndarray:
    """The distinct hashes of every `n_gram`-word n-gram, normalized exactly as datatrove's filter does."""
    config = decont_config(n_gram)
    tokenizer = load_word_tokenizer(language)
    hash_func = create_hash_func(config.hash_config)
    hashes = {hash_func(" ".join(gram)) for text in texts
              for gram in ngrams(tokenizer.word_tokenize(simplify_text(text, config.norm_config)), n_gram)}
    return np.array(sorted(hashes), dtype=config.hash_config.np_descr)


def build_index(eval_sets: list[Path], n_gram: int, language: str, folder: Path) -> dict[str, int]:
    """Writes `<name>.index.hashes` per eval set into `folder`; returns the n-gram count of each."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for path in eval_sets:
        name = eval_set_name(Path(path))
        if name in counts:
            raise StageError(f"decontaminate.eval_sets: two files are both named {name!r}; rename one")
        hashes = ngram_hashes(eval_texts(Path(path)), n_gram, language)
        tmp = folder / f"{name}.index.hashes.tmp"
        hashes.tofile(tmp)
        tmp.replace(folder / f"{name}.index.hashes")
        counts[name] = len(hashes)
    return counts
