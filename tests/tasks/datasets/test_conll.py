"""The CoNLL-2003 loader on the real dev/test files, and on broken copies of them."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tasks.datasets import DatasetError
from tasks.datasets.conll import read_conll, tag_labels, tag_scheme

NER = (Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "ner").resolve()


def sentences_by_hand(path: Path) -> int:
    """Blank-line separated blocks that are not -DOCSTART- lines, counted without the loader."""
    blocks = [b for b in path.read_text(encoding="utf-8").split("\n\n") if b.strip()]
    return sum(1 for b in blocks if not b.strip().startswith("-DOCSTART-") or "\n" in b.strip())


@pytest.mark.parametrize("name,count", [("conll2003-valid.txt", 3250), ("conll2003-test.txt", 3453)])
def test_real_files_read_every_sentence(name, count):
    sentences = read_conll(NER / name)
    assert len(sentences) == count == sentences_by_hand(NER / name)
    assert all(len(s.tokens) == len(s.tags) > 0 for s in sentences)
    assert tag_scheme(sentences) == "IOB2"
    assert tag_labels(sentences) == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert sentences[0].line == 3 and len({s.id for s in sentences}) == count


def test_the_first_dev_sentence():
    first = read_conll(NER / "conll2003-valid.txt")[0]
    assert first.tokens[:3] == ("CRICKET", "-", "LEICESTERSHIRE") and first.tags[2] == "B-ORG" and first.line == 3


def test_iob1_is_recognised(tmp_path):
    path = tmp_path / "iob1.txt"
    path.write_text("EU NNP B-NP I-ORG\nrejects VBZ B-VP O\n\nGerman JJ B-NP I-MISC\ncall NN I-NP O\n")
    sentences = read_conll(path)
    assert [s.tags for s in sentences] == [("I-ORG", "O"), ("I-MISC", "O")]
    assert tag_scheme(sentences) == "IOB1"


def broken_copy(tmp_path: Path, edit) -> Path:
    lines = (NER / "conll2003-valid.txt").read_text(encoding="utf-8").split("\n")[:40]
    path = tmp_path / "broken.txt"
    path.write_text("\n".join(edit(lines)) + "\n", encoding="utf-8")
    return path


def test_bad_lines_cost_their_sentence_and_are_reported(tmp_path):
    good = read_conll(broken_copy(tmp_path, lambda lines: lines))
    path = broken_copy(tmp_path, lambda lines: [*lines[:4], "LEICESTERSHIRE NNP B-ORG", *lines[5:9],
                                                lines[9].rsplit(" ", 1)[0] + " X-PER", *lines[10:]])
    found = []
    sentences = read_conll(path, found.append)
    assert Counter(row.reason for row in found) == {"wrong_column_count": 1}
    assert found[0].line == 5 and "expected 4" in found[0].detail
    assert len(sentences) == len(good) - 1 and sentences[0].tokens == good[1].tokens
    with pytest.raises(DatasetError, match=r"broken.txt:5: expected 4 space-separated columns"):
        read_conll(path)


def test_a_bad_tag_is_reported(tmp_path):
    path = broken_copy(tmp_path, lambda lines: [*lines[:3], lines[3].rsplit(" ", 1)[0] + " ORG", *lines[4:]])
    found = []
    read_conll(path, found.append)
    assert [(r.reason, r.line) for r in found] == [("bad_tag", 4)]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match="nope.txt: file not found"):
        read_conll(tmp_path / "nope.txt")
