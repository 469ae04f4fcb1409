"""Every metric against values worked out by hand, and against scikit-learn / scipy on random labels."""
from __future__ import annotations

import random

import pytest
from scipy import stats
from sklearn import metrics as sk

from tasks.finetune import metrics as m
from tasks.finetune.conlleval import conll_scores, entities


def test_hand_computed_classification():
    golds = [1, 1, 1, 0, 0, 0, 0, 1]
    preds = [1, 1, 0, 0, 0, 1, 0, 1]            # tp 3, fn 1, fp 1, tn 3
    assert m.accuracy(preds, golds) == 6 / 8
    assert m.f1_binary(preds, golds) == 2 * 3 / (2 * 3 + 1 + 1)
    # MCC = (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (9 - 1) / sqrt(4 * 4 * 4 * 4)
    assert m.matthews_corrcoef(preds, golds) == pytest.approx(8 / 16)
    assert m.matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0          # a constant prediction: undefined -> 0
    assert m.f1_binary([0, 0], [0, 0]) == 0.0                         # no positive anywhere


def test_hand_computed_correlations():
    assert m.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert m.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert m.ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]         # ties share the mean rank
    assert m.spearmanr([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)   # monotone, not linear
    assert m.pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_macro_and_weighted_f1_by_hand():
    golds = ["a", "a", "b", "c"]
    preds = ["a", "b", "b", "a"]
    # a: tp 1 fp 1 fn 1 -> 1/2; b: tp 1 fp 1 fn 0 -> 2/3; c: tp 0 -> 0
    assert m.f1_macro(preds, golds) == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert m.f1_weighted(preds, golds) == pytest.approx((2 * 1 / 2 + 1 * 2 / 3 + 0) / 4)


@pytest.mark.parametrize("seed", range(5))
def test_against_sklearn_and_scipy(seed):
    rng = random.Random(seed)
    golds = [rng.randrange(3) for _ in range(200)]
    preds = [g if rng.random() < 0.6 else rng.randrange(3) for g in golds]
    assert m.accuracy(preds, golds) == pytest.approx(sk.accuracy_score(golds, preds))
    assert m.matthews_corrcoef(preds, golds) == pytest.approx(sk.matthews_corrcoef(golds, preds))
    assert m.f1_macro(preds, golds) == pytest.approx(sk.f1_score(golds, preds, average="macro"))
    assert m.f1_weighted(preds, golds) == pytest.approx(sk.f1_score(golds, preds, average="weighted"))
    binary_g, binary_p = [g % 2 for g in golds], [p % 2 for p in preds]
    assert m.f1_binary(binary_p, binary_g) == pytest.approx(sk.f1_score(binary_g, binary_p))
    assert m.matthews_corrcoef(binary_p, binary_g) == pytest.approx(sk.matthews_corrcoef(binary_g, binary_p))
    x = [rng.choice([0.0, 0.5, 1.0, 2.5, 5.0]) for _ in range(100)]     # many ties, like STS-B scores
    y = [v + rng.gauss(0, 1) for v in x]
    assert m.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert m.spearmanr(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


def test_lengths_must_match():
    with pytest.raises(ValueError, match="2 predictions for 3 gold"):
        m.accuracy([1, 0], [1, 0, 1])


# ---- conlleval ------------------------------------------------------------------------------

IOB2_GOLD = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "O", "B-ORG", "I-ORG", "I-ORG"]
IOB1_GOLD = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "O", "I-ORG", "I-ORG", "I-ORG"]   # the same entities


def test_entities_read_iob1_and_iob2_alike():
    expected = {("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4), ("ORG", 6, 8)}
    assert entities(IOB2_GOLD) == expected
    assert entities(IOB1_GOLD) == expected
    # conlleval's reading of ill-formed sequences: I- after O opens a chunk; a type change closes one
    assert entities(["O", "I-MISC", "I-PER", "B-PER"]) == {("MISC", 1, 1), ("PER", 2, 2), ("PER", 3, 3)}


@pytest.mark.parametrize("gold", [IOB2_GOLD, IOB1_GOLD], ids=["IOB2", "IOB1"])
def test_conll_f1_by_hand(gold):
    # predicted: PER right, first LOC right, second LOC missed, ORG cut short (wrong), one spurious MISC
    pred = ["B-PER", "I-PER", "O", "B-LOC", "O", "B-MISC", "B-ORG", "I-ORG", "O"]
    scores = conll_scores([pred], [gold])
    precision, recall = 2 / 4, 2 / 4
    assert scores["precision"] == precision and scores["recall"] == recall
    assert scores["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert scores["accuracy"] == pytest.approx(sum(p == g for p, g in zip(pred, gold)) / 9)


def test_conll_scores_sum_over_sentences():
    scores = conll_scores([["B-PER"], ["O"]], [["B-PER"], ["B-LOC"]])
    assert (scores["precision"], scores["recall"]) == (1.0, 0.5)


def test_the_glue_table_averages_what_berts_table_1_reports():
    """F1 for MRPC/QQP and Spearman for STS-B enter the average (BERT's Table 1); STS-B's Pearson used to."""
    from tasks.finetune.report import glue_table

    results = {"stsb": {"pearson": 0.80, "spearmanr": 0.60}, "mrpc": {"f1": 0.90, "accuracy": 0.70},
               "cola": {"matthews_corrcoef": 0.30, "accuracy": 0.75}, "wnli": {"accuracy": 0.10}}
    header, _, scores, _ = glue_table(results, {}, "t").splitlines()[:4]
    cell = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in scores.split("|")[1:-1]]))
    assert (cell["STS-B"], cell["MRPC"], cell["CoLA"], cell["QQP"]) == ("80.0/60.0", "90.0/70.0", "30.0", "-")
    assert cell["Average"] == f"{(0.60 + 0.90 + 0.30) / 3 * 100:.1f}"            # WNLI left out
