"""Evaluation sets for decontamination: their texts, and the n-gram hash index datatrove's filter reads.

The texts come from the dataset loaders the fine-tuning stage uses (`tasks.datasets`): a GLUE `.tsv`
(task from its folder name) gives each example's sentences, a SQuAD `.json` its contexts, questions
and answers. The evaluate stage's multiple-choice files as released (ARC, PIQA, WinoGrande, LAMBADA
or any JSONL of `text` rows, HellaSwag, SWAG as JSON lines, a JSON array or val.csv; the layout is told
by the fields of the first row) give each item's question or context, alone and followed by each of its
choices, in their raw text (no "Question:" rendering, no labels file needed: every row with text is
indexed, whatever its label). Which fields hold those texts is the evaluate readers' knowledge
(`tasks.datasets.multiple_choice`), read here through `iter_row_texts`.

An eval text with fewer words than `n_gram` adds no n-gram, so a page quoting only it is not found;
`build_index` counts them (`texts_shorter_than_n_gram`: 29% of SST-2 dev, 87% of CoLA dev at 13).

datatrove's `NGramsDecontIndexer` loads tasks through lighteval (and the network); here
the index is built from the files the recipe names, with the same normalization, tokenizer and hash
as datatrove's `NGramsDecontFilter`, in its format (`<eval set>.index.hashes`, one uint64 per n-gram).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from datatrove.pipeline.decont.n_grams import NGramsDecontConfig
from datatrove.utils.hashing import create_hash_func
from datatrove.utils.text import ngrams, simplify_text
from datatrove.utils.word_tokenizers import load_word_tokenizer

from storage.stage import StageError
from tasks.datasets import DatasetError, iter_glue, iter_squad
from tasks.datasets.multiple_choice import detect_format, iter_row_texts

UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.\-]+")


def eval_set_name(path: Path) -> str:
    """`<folder>-<stem>`, e.g. `sst2-dev`, `squad-dev-v2.0-subset`: the name in stats and metadata."""
    return UNSAFE_NAME.sub("_", f"{path.parent.name}-{path.stem}")


def eval_texts(path: Path) -> list[str]:
    """Every distinct non-blank text of a GLUE `.tsv`, SQuAD `.json` or multiple-choice file, in file order."""
    if not path.is_file():
        raise StageError(f"decontaminate.eval_sets: file not found: {path}")
    if path.suffix not in (".tsv", ".json", ".jsonl", ".csv"):
        raise StageError(f"decontaminate.eval_sets: {path}: unsupported file type (GLUE .tsv, SQuAD .json, or "
                         "an ARC/PIQA/WinoGrande/LAMBADA/HellaSwag/SWAG .jsonl; SWAG also .csv or a .json array)")
    try:
        if path.suffix == ".tsv":
            texts: Iterator[str] = (text for example in iter_glue(path) for text in example.texts())
        elif path.suffix == ".json" and not _is_choice_file(path):
            texts = (text for example in iter_squad(path) for text in example.texts())
        else:
            texts = choice_texts(path)
        # a dict keeps order and drops repeats (SQuAD repeats a context for each of its questions)
        return list(dict.fromkeys(text for text in texts if text.strip()))
    except DatasetError as err:
        raise StageError(f"decontaminate.eval_sets: {err}") from None


# --- multiple-choice files: the layouts are the evaluate stage's (tasks.datasets.multiple_choice) ----------

def _is_choice_file(path: Path) -> bool:
    """Whether a `.json` file's first row is in a multiple-choice layout (else it is read as SQuAD)."""
    try:
        detect_format(path)
    except DatasetError:
        return False
    return True


def choice_texts(path: Path) -> Iterator[str]:
    """Per row: its question or context alone, and followed by each choice (raw text, as a page would quote it);
    the layout is told by the first row's fields."""
    for row in iter_row_texts(detect_format(path), path):
        yield from row.quotes()


def decont_config(n_gram: int) -> NGramsDecontConfig:
    return NGramsDecontConfig(n_grams=n_gram)


def ngram_hashes(texts: list[str], n_gram: int, language: str) -> tuple[np.ndarray, int]:
    """The distinct hashes of every `n_gram`-word n-gram, normalized exactly as datatrove's filter does, and
    how many texts have fewer than `n_gram` words (they add no n-gram: a page quoting only them is not found)."""
    config = decont_config(n_gram)
    tokenizer = load_word_tokenizer(language)
    hash_func = create_hash_func(config.hash_config)
    hashes, short = set(), 0
    for text in texts:
        words = tokenizer.word_tokenize(simplify_text(text, config.norm_config))
        short += len(words) < n_gram
        hashes.update(hash_func(" ".join(gram)) for gram in ngrams(words, n_gram))
    return np.array(sorted(hashes), dtype=config.hash_config.np_descr), short


def build_index(eval_sets: list[Path], n_gram: int, language: str, folder: Path) -> dict[str, dict[str, int]]:
    """Writes `<name>.index.hashes` per eval set into `folder`; returns per set its counts: `ngrams`, `texts`
    and `texts_shorter_than_n_gram` (texts decontamination cannot find)."""
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for path in eval_sets:
        name = eval_set_name(Path(path))
        if name in counts:
            raise StageError(f"decontaminate.eval_sets: two files are both named {name!r}; rename one")
        texts = eval_texts(Path(path))
        hashes, short = ngram_hashes(texts, n_gram, language)
        tmp = folder / f"{name}.index.hashes.tmp"
        hashes.tofile(tmp)
        tmp.replace(folder / f"{name}.index.hashes")
        counts[name] = {"ngrams": len(hashes), "texts": len(texts), "texts_shorter_than_n_gram": short}
    return counts
