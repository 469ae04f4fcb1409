"""Kind multiple_choice: the recipe fields, the real ARC/PIQA/WinoGrande files read into a fixed number of
answers (other counts counted with file and line), and one (context, answer) sequence per answer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiktoken
from pydantic import ValidationError

from storage.stage import StageError
from tasks.finetune.config import FinetuneConfig, TaskConfig
from tasks.finetune.data import BadRowCounter, load_task
from tasks.finetune.encode import BertLayout, GptLayout, Specials
from tasks.finetune.prepare import Preparer

CHOICE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "multiple_choice"
ARC = {"name": "arc", "kind": "multiple_choice", "format": "arc", "train": str(CHOICE / "arc_easy/ARC-Easy-Dev.jsonl"),
       "split": {"eval_fraction": 0.25}}
PIQA = {"name": "piqa", "kind": "multiple_choice", "format": "piqa", "train": str(CHOICE / "piqa/valid.jsonl"),
        "train_labels": str(CHOICE / "piqa/valid-labels.lst"), "split": {"eval_fraction": 0.2}}
BYTES = tiktoken.Encoding("bytes", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                          special_tokens={})


@pytest.mark.parametrize("task,message", [
    ({**ARC, "format": None}, "needs format, one of arc, piqa"),
    ({**ARC, "format": "lambada"}, "needs format"),
    ({**ARC, "train_labels": "x.lst"}, "arc files carry their labels; remove train_labels"),
    ({**PIQA, "train_labels": None}, "piqa keeps its labels in a separate file: set train_labels"),
    ({**PIQA, "split": None, "eval": "valid.jsonl"}, "set eval_labels"),
    ({**ARC, "kind": "glue"}, "format is a kind multiple_choice option"),
    ({**ARC, "split": None, "eval": {"a": "x", "b": "y"}}, "scores one eval file"),
])
def test_the_recipe_fields_are_checked(task: dict, message: str):
    with pytest.raises(ValidationError, match=message):
        FinetuneConfig.model_validate({"tasks": [task]})


def test_labels_files_enter_the_fingerprint_inputs():
    assert TaskConfig.model_validate(PIQA).data_paths() == [PIQA["train"], PIQA["train_labels"]]


def test_arc_trains_four_answers_and_counts_the_other_items_with_file_and_line():
    bad = BadRowCounter()
    data = load_task(TaskConfig.model_validate(ARC), 0, bad)
    assert data.form == "choice" and data.labels == [0, 1, 2, 3] and data.metrics == ("accuracy",)
    kept = data.train + data.evals["arc"]
    assert len(kept) == 567 and all(len(item.choices) == 4 for item in kept)
    assert sorted(row.reason for row in bad.rows) == ["choice_count"] * 3
    assert all(row.path == ARC["train"] and row.line for row in bad.rows)
    train_keys = {item.contexts[0] for item in data.train}
    assert not train_keys & {item.contexts[0] for item in data.evals["arc"]}     # the carve splits by text


def test_piqa_reads_its_labels_file_and_winogrande_keeps_per_option_contexts():
    piqa = load_task(TaskConfig.model_validate(PIQA), 0, BadRowCounter())
    assert piqa.labels == [0, 1] and len(piqa.train) + len(piqa.evals["piqa"]) == 1838
    assert {item.label for item in piqa.train} == {0, 1}
    wino = load_task(TaskConfig.model_validate({
        "name": "wino", "kind": "multiple_choice", "format": "winogrande",
        "train": str(CHOICE / "winogrande/dev.jsonl"), "train_labels": str(CHOICE / "winogrande/dev-labels.lst"),
        "split": {"eval_fraction": 0.2}}), 0, BadRowCounter())
    item = wino.train[0]
    assert item.contexts[0] != item.contexts[1] and item.continuations[0] == item.continuations[1]


def test_one_sequence_per_answer_labelled_with_the_right_index():
    data = load_task(TaskConfig.model_validate({**ARC, "max_train_examples": 5}), 0, BadRowCounter())
    gpt = Preparer(data, GptLayout(Specials(start=300, delim=301, extract=302, pad=256), 512), BYTES)
    prepared = gpt.prepare(data.train, True, BadRowCounter(), "arc")
    features, item = prepared.features, data.train[0]
    assert features.n_seq == 4 and len(features) == 5 and features.label_kind == "class"
    assert list(features.labels) == [e.label for e in data.train]
    batch = features.batch([0], pad_id=256)
    for answer in range(4):
        ids = [int(t) for t, keep in zip(batch["input_ids"][0, answer], batch["attention_mask"][0, answer]) if keep]
        context, continuation = item.contexts[answer], item.continuations[answer]
        assert ids == [300, *context.encode(), 301, *continuation.encode(), 302]   # start context delim answer extract
    bert = Preparer(data, BertLayout(Specials(start=257, delim=258, extract=258, pad=260), 512), BYTES)
    assert bert.prepare(data.train, True, BadRowCounter(), "arc").features.segments is not None


def arc_line(n_choices: int, index: int) -> str:
    choices = [{"label": "ABCDE"[i], "text": f"answer {i}"} for i in range(n_choices)]
    return json.dumps({"id": f"q{index}", "question": {"stem": f"Why {index}?", "choices": choices}, "answerKey": "A"})


def test_an_eval_file_without_an_item_of_the_trained_answer_count_is_refused(tmp_path: Path):
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join(arc_line(2, i) for i in range(4)) + "\n")
    evaluation.write_text("\n".join(arc_line(3, i) for i in range(4)) + "\n")
    with pytest.raises(StageError, match=r"task 'arc': .*eval.jsonl has no item with 2 answers"):
        load_task(TaskConfig.model_validate({**ARC, "train": str(train), "split": None, "eval": str(evaluation)}), 0,
                  BadRowCounter())
