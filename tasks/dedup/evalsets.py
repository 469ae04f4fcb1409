"""Evaluation sets for decontamination: their texts, and the n-gram hash index datatrove's filter reads.

datatrove's `NGramsDecontIndexer` loads tasks through lighteval (and the network); here the index is
built from the files the recipe names, with the same normalization, tokenizer and hash as datatrove's
`NGramsDecontFilter`, in its format (`<eval set>.index.hashes`, one uint64 per n-gram).
"""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
from datatrove.pipeline.decont.n_grams import NGramsDecontConfig
from datatrove.utils.hashing import create_hash_func
from datatrove.utils.text import ngrams, simplify_text
from datatrove.utils.word_tokenizers import load_word_tokenizer

from storage.stage import StageError

# GLUE column names that hold text (the header is lower-cased and stripped of a BOM first).
GLUE_TEXT_COLUMNS = {"text", "sentence", "sentence1", "sentence2", "question", "question1", "question2",
                     "premise", "hypothesis", "#1 string", "#2 string"}
UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.\-]+")


def eval_set_name(path: Path) -> str:
    """`<folder>-<stem>`, e.g. `sst2-dev`, `squad-dev-v2.0-subset`: the name in stats and metadata."""
    return UNSAFE_NAME.sub("_", f"{path.parent.name}-{path.stem}")


def eval_texts(path: Path) -> list[str]:
    """Every text of a GLUE `.tsv` or SQuAD `.json` file; a clear StageError for anything else."""
    if not path.is_file():
        raise StageError(f"decontaminate.eval_sets: file not found: {path}")
    if path.suffix == ".tsv":
        return glue_texts(path)
    if path.suffix == ".json":
        return squad_texts(path)
    raise StageError(f"decontaminate.eval_sets: {path}: unsupported file type (GLUE .tsv or SQuAD .json)")


def glue_texts(path: Path) -> list[str]:
    """The text columns of a GLUE TSV (quotes are literal characters in GLUE, not CSV quoting)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [name.strip().lower() for name in next(rows, [])]
        columns = [i for i, name in enumerate(header) if name in GLUE_TEXT_COLUMNS]
        if not columns:
            raise StageError(f"decontaminate.eval_sets: {path}: no text column in header {header} "
                             f"(expected one of {sorted(GLUE_TEXT_COLUMNS)})")
        return [row[i] for row in rows for i in columns if i < len(row) and row[i].strip()]


def squad_texts(path: Path) -> list[str]:
    """Contexts, questions and answers of SQuAD: the official nested format or flat rows."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StageError(f"decontaminate.eval_sets: {path}: not valid JSON ({err})") from err
    items = data.get("data") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise StageError(f"decontaminate.eval_sets: {path}: expected SQuAD JSON with a 'data' list")
    texts: dict[str, None] = {}  # ordered and without repeats: flat rows repeat their context
    for item in items:
        for record in _squad_records(item):
            texts.update((t, None) for t in _record_texts(record) if t.strip())
    return list(texts)


def _squad_records(item: dict) -> list[dict]:
    """Flat `{context, question, answers}` records of one nested article (or of one flat row)."""
    if "paragraphs" not in item:
        return [item]
    return [{"context": p.get("context", ""), "qas": p.get("qas", [])} for p in item["paragraphs"]]


def _record_texts(record: dict) -> list[str]:
    texts = [record.get("context") or "", record.get("question") or ""]
    answers = record.get("answers") or {}
    texts += answers.get("text", []) if isinstance(answers, dict) else [a.get("text", "") for a in answers]
    for qa in record.get("qas", []):
        texts.append(qa.get("question", ""))
        texts += [a.get("text", "") for a in qa.get("answers", [])]
    return texts


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
