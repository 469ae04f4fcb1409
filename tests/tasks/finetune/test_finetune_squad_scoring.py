"""SQuAD scoring as the official v2.0 script does it, and the n-best decoder on crafted logits."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.datasets.squad import SquadAnswer, SquadExample, read_squad
from tasks.finetune.nbest import NO_SPAN_ODDS, Window, answer, decode, max_context_flags
from tasks.finetune.squad_eval import compute_exact, compute_f1, normalize_answer, squad_scores


def question(qid: str, *answers: str) -> SquadExample:
    context = " ".join(answers) or "nothing"
    return SquadExample(qid, "t", context, "q?", tuple(SquadAnswer(a, context.find(a)) for a in answers), not answers)


def test_normalisation_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Theatre") == "theatre"                   # 'the' only as a word
    assert normalize_answer("  \tU.S.A. ") == "usa"


def test_exact_and_f1_by_hand():
    assert compute_exact("The Denver Broncos", "denver broncos.") == 1
    # gold {denver, broncos}, prediction {broncos, won}: 1 common, P = R = 1/2
    assert compute_f1("Denver Broncos", "Broncos won") == pytest.approx(0.5)
    assert compute_f1("Denver Broncos", "Carolina") == 0.0
    assert compute_f1("", "") == 1.0 and compute_f1("", "something") == 0.0


def test_max_over_gold_answers_and_empty_answers_for_v2():
    examples = [question("q1", "Santa Clara", "Levi's Stadium"), question("q2"), question("q3"), question("q4", "1990")]
    predictions = {"q1": "Levi's Stadium in", "q2": "", "q3": "1984", "q4": ""}
    # q1: EM 0, F1 vs "Levi's Stadium": P 2/3 R 1 -> 0.8; q2: empty for unanswerable -> 1; q3: 0; q4: 0
    scores = squad_scores(examples, predictions)
    assert scores["exact"] == pytest.approx(100 * 1 / 4)
    assert scores["f1"] == pytest.approx(100 * (0.8 + 1) / 4)
    assert (scores["HasAns_total"], scores["NoAns_total"]) == (2.0, 2.0)
    assert scores["NoAns_exact"] == pytest.approx(50.0)


def test_null_odds_threshold_and_best_threshold():
    examples = [question("a", "x y"), question("b")]
    predictions = {"a": "x y", "b": "x"}
    # the official script: na_prob > 1.0 counts as "no answer"
    scores = squad_scores(examples, predictions, {"a": 0.2, "b": 3.0})
    assert scores["exact"] == 100.0
    scores = squad_scores(examples, predictions, {"a": 0.2, "b": 0.5})
    assert scores["exact"] == 50.0
    # best threshold: answering only below 0.2 keeps "a" right and "b" empty -> 100
    assert (scores["best_exact"], scores["best_exact_thresh"]) == (100.0, 0.2)


def test_official_script_agrees_on_the_real_v2_subset(shared_data, tmp_path):
    """The official script's own functions (written out here from the v2.0 script) on real questions."""
    examples = read_squad(shared_data / "squad" / "dev-v2.0-subset.json")
    rng = np.random.default_rng(0)
    predictions = {e.id: (e.answers[0].text if e.answers and rng.random() < 0.5 else
                          "" if rng.random() < 0.5 else e.context[:12]) for e in examples}
    scores = squad_scores(examples, predictions)
    official = official_v2(json.loads((shared_data / "squad" / "dev-v2.0-subset.json").read_text())["data"],
                           predictions)
    assert scores["exact"] == pytest.approx(official["exact"]) and scores["f1"] == pytest.approx(official["f1"])


def official_v2(dataset: list, predictions: dict) -> dict:
    """evaluate-v2.0.py's get_raw_scores + make_eval_dict, transcribed without our helpers."""
    import collections
    import re
    import string

    def normalize(s):
        s = s.lower()
        s = "".join(ch for ch in s if ch not in set(string.punctuation))
        s = re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", s)
        return " ".join(s.split())

    def f1(a_gold, a_pred):
        gold_toks = normalize(a_gold).split() if a_gold else []
        pred_toks = normalize(a_pred).split() if a_pred else []
        common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
        num_same = sum(common.values())
        if len(gold_toks) == 0 or len(pred_toks) == 0:
            return int(gold_toks == pred_toks)
        if num_same == 0:
            return 0
        precision, recall = num_same / len(pred_toks), num_same / len(gold_toks)
        return (2 * precision * recall) / (precision + recall)

    exact, f1s = [], []
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                golds = [a["text"] for a in qa["answers"] if normalize(a["text"])] or [""]
                exact.append(max(int(normalize(a) == normalize(predictions[qa["id"]])) for a in golds))
                f1s.append(max(f1(a, predictions[qa["id"]]) for a in golds))
    return {"exact": 100.0 * sum(exact) / len(exact), "f1": 100.0 * sum(f1s) / len(f1s)}


# ---- n-best decoding ------------------------------------------------------------------------

CONTEXT = "Alpha Beta Gamma Delta Epsilon Zeta"
WORDS = [(0, 5), (6, 10), (11, 16), (17, 22), (23, 30), (31, 35)]


def window(first_word: int, n_words: int, flags: list[bool], start: dict[int, float], end: dict[int, float],
           null: float = 0.0) -> Window:
    """[null] + n_words context tokens (word i of the context at position 1 + i - first_word)."""
    size = 1 + n_words
    start_logits, end_logits = np.full(size, -10.0), np.full(size, -10.0)
    start_logits[0] = end_logits[0] = null / 2
    for word, value in start.items():
        start_logits[1 + word - first_word] = value
    for word, value in end.items():
        end_logits[1 + word - first_word] = value
    offsets = [None] + WORDS[first_word:first_word + n_words]
    return Window(start_logits, end_logits, offsets, [False] + flags, 0)


def test_max_context_prefers_the_window_with_more_words_around():
    # windows over tokens 0-3 and 2-5: token 2 and 3 appear in both
    flags = max_context_flags([0, 2], [4, 4])
    assert flags[0] == [True, True, True, False]      # token 2: 2 left / 1 right here, 0 left / 3 right there
    assert flags[1] == [False, True, True, True]


def test_an_answer_in_two_overlapping_windows_is_one_candidate_with_the_better_score():
    flags = max_context_flags([0, 2], [4, 4])
    # "Gamma Delta" (words 2-3) scored in both windows; word 2 has max context in window 0, so window 1's
    # higher-scoring copy of the same span is not used (its start token has less context there)
    first = window(0, 4, flags[0], start={2: 3.0, 0: 1.0}, end={3: 3.0, 1: 0.5}, null=-5.0)
    second = window(2, 4, flags[1], start={2: 9.0, 4: 2.0}, end={3: 9.0, 5: 2.5}, null=1.0)
    candidates, null_odds = decode([first, second], CONTEXT, n_best=20, max_answer_length=30)
    texts = [c.text for c in candidates]
    assert texts[0] == "Gamma Delta" and texts.count("Gamma Delta") == 1
    assert candidates[0].score == 6.0                 # window 0's score: the max-context one
    assert "Epsilon Zeta" in texts                     # window 1's own span (word 4 has max context there)
    assert null_odds == pytest.approx(-5.0 - 6.0)     # the lowest null score over windows minus the best span


def test_spans_respect_order_and_length_and_v2_null_answers():
    only = window(0, 6, [True] * 6, start={4: 5.0, 1: 1.0}, end={2: 6.0, 5: 0.0}, null=4.0)
    candidates, null_odds = decode([only], CONTEXT, n_best=20, max_answer_length=2)
    assert [c.text for c in candidates][:2] == ["Beta Gamma", "Epsilon Zeta"]   # end-before-start (4..2) skipped
    assert all(len(c.text.split()) <= 2 for c in candidates)
    assert null_odds == pytest.approx(4.0 - 7.0)
    assert answer(candidates, null_odds, allow_null=True, threshold=0.0) == "Beta Gamma"
    assert answer(candidates, null_odds, allow_null=True, threshold=-5.0) == ""
    assert answer(candidates, 99.0, allow_null=False, threshold=0.0) == "Beta Gamma"    # v1 never answers ""
    assert decode([window(0, 1, [False], {}, {})], CONTEXT)[1] == NO_SPAN_ODDS


@pytest.mark.parametrize("threshold", [-2.0, 0.0, 0.5, 5.0])
def test_metrics_are_those_of_the_answers_decoded_with_the_tasks_null_threshold(threshold):
    """With null_threshold above the script's default 1.0, a span kept at null_odds 3 used to be scored as
    "no answer" in metrics.json while predictions.json held the (right) span."""
    from tasks.finetune.data import TaskData
    from tasks.finetune.nbest import Candidate
    from tasks.finetune.predict import Predictions
    from tasks.finetune.score import score

    examples = [question("a", "x y"), question("b", "u v"), question("c"), question("d")]
    odds = [3.0, -1.0, 8.0, 0.3]
    span = {"a": "x y", "b": "u v", "c": "x y", "d": "u v"}
    answers = [answer([Candidate(span[e.id], 1.0, 0.5, 0.5)], o, True, threshold) for e, o in zip(examples, odds)]
    v2 = TaskData("s", "squad", "qa", [], ("exact", "f1"), [], {}, allow_null=True)
    found = score(v2, examples, Predictions(answers, odds, [[]] * 4), null_threshold=threshold)
    from_answers = squad_scores(examples, dict(zip("abcd", answers)))     # predictions.json alone
    assert {k: found[k] for k in from_answers} == pytest.approx(from_answers)
    official = squad_scores(examples, dict(zip("abcd", answers)), dict(zip("abcd", odds)), na_prob_thresh=threshold)
    assert found == pytest.approx(official)                               # script with --na-prob-thresh
    v1 = TaskData("s", "squad", "qa", [], ("exact", "f1"), [], {}, allow_null=False)
    spans = [span[e.id] for e in examples[:2]]
    assert score(v1, examples[:2], Predictions(spans, [-5.0, -5.0], [[]] * 2), null_threshold=-9.0)["exact"] == 100.0
