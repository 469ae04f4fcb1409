"""Financial PhraseBank and FOMC loaders on the real files, and on broken copies."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tasks.datasets import DatasetError
from tasks.datasets.finance import read_fomc, read_phrasebank

FINANCE = (Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "finance").resolve()
FPB = FINANCE / "financial_phrasebank"
FOMC = FINANCE / "fomc_hawkish_dovish"


def test_phrasebank_all_agree_counts_the_line_without_a_separator():
    found = []
    examples = read_phrasebank(FPB / "Sentences_AllAgree.txt", found.append)
    assert len(examples) == 2263 and [(r.reason, r.line) for r in found] == [("no_label_separator", 38)]
    assert Counter(e.label for e in examples) == {"neutral": 1390, "positive": 570, "negative": 303}
    with pytest.raises(DatasetError, match=r"Sentences_AllAgree.txt:38: no '@'"):
        read_phrasebank(FPB / "Sentences_AllAgree.txt")


def test_phrasebank_is_latin1():
    examples = read_phrasebank(FPB / "Sentences_50Agree.txt")
    assert len(examples) == 4846 and Counter(e.label for e in examples) == {"neutral": 2879, "positive": 1363,
                                                                            "negative": 604}
    raw = (FPB / "Sentences_50Agree.txt").read_bytes()
    accented = [e for e in examples if any(ord(ch) > 127 for ch in e.text)]
    assert accented and all(e.text.encode("latin-1") in raw for e in accented[:20])


def test_phrasebank_bad_rows(tmp_path):
    path = tmp_path / "fpb.txt"
    text = "Good news .@positive\nNo label here\nOdd .@bullish\n @neutral\nFine .@negative\n"
    path.write_bytes(text.encode("latin-1"))
    found = []
    examples = read_phrasebank(path, found.append)
    assert [e.label for e in examples] == ["positive", "negative"] and [e.id for e in examples] == ["1", "5"]
    assert [(r.line, r.reason) for r in found] == [(2, "no_label_separator"), (3, "unknown_label"), (4, "empty_text")]


@pytest.mark.parametrize("name,count,labels", [
    ("lab-manual-combine-train-5768.csv", 1903, {"neutral": 929, "dovish": 498, "hawkish": 476}),
    ("lab-manual-combine-test-5768.csv", 476, {"neutral": 225, "dovish": 127, "hawkish": 124})])
def test_fomc_real_files(name, count, labels):
    examples = read_fomc(FOMC / name)
    assert len(examples) == count and Counter(e.label for e in examples) == labels
    assert all(e.group.isdigit() and 1990 <= int(e.group) <= 2030 for e in examples)
    assert len({e.id for e in examples}) == count          # ids are line numbers: the index column repeats


def test_fomc_bad_rows(tmp_path):
    path = tmp_path / "fomc.csv"
    path.write_text('index,sentence,year,label\n1,"Rates rise, again.",2008,1\n2,short row,2008\n'
                    '3,Unknown,2009,7\n4,,2010,0\n5,No year,then,2\n6,"Cut, cut.",2011,0\n')
    found = []
    examples = read_fomc(path, found.append)
    assert [(e.id, e.label, e.group) for e in examples] == [("2", "hawkish", "2008"), ("7", "dovish", "2011")]
    assert [(r.line, r.reason) for r in found] == [(3, "wrong_column_count"), (4, "unknown_label"), (5, "empty_text"),
                                                   (6, "bad_year")]
    path.write_text("id,text,label\n1,x,0\n")
    with pytest.raises(DatasetError, match=r"fomc.csv:1: expected the header index,sentence,year,label"):
        read_fomc(path)
