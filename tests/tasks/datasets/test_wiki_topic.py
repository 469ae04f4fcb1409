"""The offline topic task: the installed wiki summaries, their 12 topics, and the salted title split."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from tasks.datasets import DatasetError
from tasks.datasets.wiki_topic import TOPICS, is_test, read_wiki_topic, split_wiki_topic, summaries_path


def test_every_english_summary_has_one_of_the_twelve_topics():
    examples = read_wiki_topic(summaries_path("en"))
    assert len(examples) == 10033 and set(Counter(e.label for e in examples)) == set(TOPICS)
    assert all(e.text.strip() for e in examples) and [e.id for e in examples] == sorted(e.id for e in examples)


def test_the_split_is_by_title_and_stable():
    examples = read_wiki_topic(summaries_path("en"))
    train, test = split_wiki_topic(examples, "train"), split_wiki_topic(examples, "test")
    assert len(train) + len(test) == len(examples) and not {e.id for e in train} & {e.id for e in test}
    assert 0.18 < len(test) / len(examples) < 0.22
    assert [e.id for e in test] == [e.id for e in examples if is_test(e.id)]
    assert is_test("2001: A Space Odyssey") == is_test("2001: A Space Odyssey")
    assert len(split_wiki_topic(examples, "test", 0.5)) > 2 * len(test)
    with pytest.raises(ValueError, match="split 'dev'"):
        split_wiki_topic(examples, "dev")


def test_bad_summaries_are_reported(tmp_path):
    path = tmp_path / "summaries.json"
    path.write_text(json.dumps({"A": {"extract": "About A.", "topic": "Arts"}, "B": {"extract": " ", "topic": "Arts"},
                                "C": {"extract": "About C.", "topic": "Cooking"}, "D": "text"}))
    found = []
    examples = read_wiki_topic(path, found.append)
    assert [e.id for e in examples] == ["A"]
    assert [r.reason for r in found] == ["empty_text", "unknown_label", "not_an_object"]
    assert "'C'" in str(found[1])
    with pytest.raises(DatasetError, match="language 'de' is not shipped"):
        summaries_path("de")
