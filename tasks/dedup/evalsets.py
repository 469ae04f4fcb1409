"""Evaluation sets for decontamination: their texts, and the n-gram hash index datatrove's filter reads.

The texts come from the dataset loaders the fine-tuning stage uses (`tasks.datasets`): a GLUE `.tsv`
(task from its folder name) gives each example's sentences, a SQuAD `.json` its contexts, questions
and answers. The evaluate stage's multiple-choice files as released (ARC, PIQA, WinoGrande, LAMBADA
or any JSONL of `text` rows, HellaSwag, SWAG; the layout is told by the fields of the first row)
give each item's question or context, alone and followed by each of its choices, in their raw text
(no "Question:" rendering, no labels file needed: every choice is indexed).

An eval text with fewer words than `n_gram` adds no n-gram, so a page quoting only it is not found;
`build_index` counts them (`texts_shorter_than_n_gram`: 29% of SST-2 dev, 87% of CoLA dev at 13).

datatrove's `NGramsDecontIndexer` loads tasks through lighteval (and the network); here
the index is built from the files the recipe names, with the same normalization, tokenizer and hash
as datatrove's `NGramsDecontFilter`, in its format (`<eval set>.index.hashes`, one uint64 per n-gram).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
    """Every distinct non-blank text of a GLUE `.tsv`, SQuAD `.json` or multiple-choice `.jsonl` file, in file order."""
    if not path.is_file():
        raise StageError(f"decontaminate.eval_sets: file not found: {path}")
    if path.suffix not in (".tsv", ".json", ".jsonl"):
        raise StageError(f"decontaminate.eval_sets: {path}: unsupported file type (GLUE .tsv, SQuAD .json, or "
                         "an ARC/PIQA/WinoGrande/LAMBADA/HellaSwag/SWAG .jsonl)")
    if path.suffix == ".tsv":
        texts: Iterator[str] = (text for example in iter_glue(path) for text in example.texts())
    elif path.suffix == ".json" and choice_layout(_first_row(path)) is None:
        texts = (text for example in iter_squad(path) for text in example.texts())
    else:
        texts = choice_texts(path)
    try:
        # a dict keeps order and drops repeats (SQuAD repeats a context for each of its questions)
        return list(dict.fromkeys(text for text in texts if text.strip()))
    except DatasetError as err:
        raise StageError(f"decontaminate.eval_sets: {err}") from None


# --- multiple-choice files as the evaluate stage reads them ------------------------------------------

def _arc(row: dict[str, Any]) -> tuple[str, list[str]]:
    question = row["question"]
    return question["stem"], [choice["text"] for choice in question["choices"]]


def _hellaswag(row: dict[str, Any]) -> tuple[str, list[str]]:
    context = row.get("ctx") or f"{row['ctx_a']} {row['ctx_b']}"
    return context, list(row["endings"])


def _swag(row: dict[str, Any]) -> tuple[str, list[str]]:
    start = row.get("startphrase") or f"{row['sent1']} {row['sent2']}"
    return start, [row[f"ending{i}"] for i in range(4)]


def _winogrande(row: dict[str, Any]) -> tuple[str, list[str]]:
    # the sentence with each option in its blank: the choices are whole sentences, there is no shared prefix
    return "", [row["sentence"].replace("_", row[key], 1) for key in ("option1", "option2")]


# layout -> (the fields its first row has, the item's (context, choices))
CHOICE_LAYOUTS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], tuple[str, list[str]]]]] = {
    "arc": (("question", "answerKey"), _arc),
    "piqa": (("goal", "sol1", "sol2"), lambda row: (row["goal"], [row["sol1"], row["sol2"]])),
    "winogrande": (("sentence", "option1", "option2"), _winogrande),
    "hellaswag": (("ctx_a", "endings"), _hellaswag),
    "swag": (("sent1", "sent2", "ending0"), _swag),
    "lambada": (("text",), lambda row: (row["text"], [])),
}


def choice_layout(row: Any) -> str | None:
    """The multiple-choice layout whose fields `row` (a file's first row) has; None for anything else."""
    if isinstance(row, dict):
        for layout, (fields, _) in CHOICE_LAYOUTS.items():
            if all(name in row for name in fields):
                return layout
    return None


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of every non-blank line; a line that is not JSON names the file and line."""
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise DatasetError(f"{path}:{number}: not valid JSON ({err.msg})") from None


def _first_row(path: Path) -> Any:
    """The first line of a `.json` file as JSON (a SQuAD file's first line is not JSON on its own: None)."""
    try:
        return next(_rows(path), (0, None))[1]
    except DatasetError:
        return None


def choice_texts(path: Path) -> Iterator[str]:
    """Per item: its question or context alone, and followed by each choice (raw text, as a page would quote it)."""
    rows = _rows(path)
    first = next(rows, None)
    layout = choice_layout(first[1]) if first else None
    if layout is None:
        if first is None:
            raise DatasetError(f"{path}: no rows")
        found = f"fields {', '.join(sorted(first[1]))}" if isinstance(first[1], dict) else f"a JSON {type(first[1]).__name__}"
        raise DatasetError(f"{path}:{first[0]}: not a multiple-choice layout the evaluate stage reads (the fields of "
                           f"{', '.join(CHOICE_LAYOUTS)} expected; found {found})")
    item = CHOICE_LAYOUTS[layout][1]
    for number, row in [first, *rows]:
        try:
            context, choices = item(row)
            texts = [context, *(f"{context} {choice}".strip() for choice in choices)]
            if not all(isinstance(text, str) for text in texts):
                raise TypeError("a field is not a string")
        except (KeyError, TypeError, IndexError, AttributeError) as err:
            raise DatasetError(f"{path}:{number}: not a {layout} row ({type(err).__name__}: {err})") from None
        yield from texts


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
