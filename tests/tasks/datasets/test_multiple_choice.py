"""The multiple-choice loaders on every real file in ../shared/data/multiple_choice, and on broken copies of them."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tasks.datasets import DatasetError
from tasks.datasets.multiple_choice import FORMATS, ChoiceItem, hellaswag_clean, read_choice_file

MC = (Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "multiple_choice").resolve()

# (format, file, labels file, rows): every file of the folder, and WinoGrande with its answers read inline.
REAL_FILES = [
    ("arc", "arc_easy/ARC-Easy-Dev.jsonl", None, 570),
    ("arc", "arc_challenge/ARC-Challenge-Dev.jsonl", None, 299),
    ("piqa", "piqa/valid.jsonl", "piqa/valid-labels.lst", 1838),
    ("winogrande", "winogrande/dev.jsonl", "winogrande/dev-labels.lst", 1267),
    ("winogrande", "winogrande/dev.jsonl", None, 1267),
    ("lambada", "lambada/lambada_test.jsonl", None, 5153),
    ("swag", "swag-sample.json", None, 10),
]


def lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("format, name, labels, rows", REAL_FILES, ids=lambda v: str(v))
def test_every_real_file_loads_every_row(format, name, labels, rows):
    data = read_choice_file(format, MC / name, MC / labels if labels else None)
    assert len(data.items) == rows == len(lines(MC / name)) and data.bad == []
    assert len({item.id for item in data.items}) == rows
    for item in data.items:
        n = len(item.continuations)
        assert len(item.contexts) == n == len(item.choices) and 0 <= item.label < n
        assert all(c.strip() for c in item.contexts)
        assert all(c.startswith(" ") and c.strip() for c in item.continuations)


def test_arc_is_rendered_as_the_harness_renders_it_with_numeric_keys_and_odd_choice_counts():
    items = {i.id: i for i in read_choice_file("arc", MC / "arc_easy/ARC-Easy-Dev.jsonl").items}
    first = items["MCAS_2000_4_6"]
    assert first.contexts == ("Question: Which technology was developed most recently?\nAnswer:",) * 4
    assert first.continuations == (" cellular telephone", " television", " refrigerator", " airplane")
    assert first.choices == ("cellular telephone", "television", "refrigerator", "airplane") and first.label == 0
    assert first.demonstration == "Question: Which technology was developed most recently?\nAnswer: cellular telephone"
    raw = {r["id"]: r for r in map(json.loads, lines(MC / "arc_easy/ARC-Easy-Dev.jsonl"))}
    numeric = [i for i in items.values() if raw[i.id]["answerKey"].isdigit()]
    assert len(numeric) == 21 and all(i.label == int(raw[i.id]["answerKey"]) - 1 for i in numeric)
    assert sorted({len(i.choices) for i in items.values()}) == [3, 4, 5]


def test_piqa_labels_come_from_the_aligned_labels_file():
    data = read_choice_file("piqa", MC / "piqa/valid.jsonl", MC / "piqa/valid-labels.lst")
    labels = [int(v) for v in lines(MC / "piqa/valid-labels.lst")]
    assert [i.label for i in data.items] == labels and set(labels) == {0, 1}
    first = data.items[0]
    assert first.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert first.continuations[0].startswith(" Provide the guinea pig with a cage full of a few inches of bedding")


def test_winogrande_scores_the_common_suffix_after_each_option_fills_the_blank():
    data = read_choice_file("winogrande", MC / "winogrande/dev.jsonl", MC / "winogrande/dev-labels.lst")
    first = data.items[0]
    assert first.id == "3FCO4VKOZ4BJQ6IFC0VAIBK4KTWE7U-2" and first.label == 1
    assert first.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                              "Sarah was a much better surgeon than Maria so Maria")
    assert first.continuations == (" always got the easier cases.",) * 2
    assert first.demonstration == "Sarah was a much better surgeon than Maria so Maria always got the easier cases."
    inline = read_choice_file("winogrande", MC / "winogrande/dev.jsonl")
    assert [i.label for i in inline.items] == [i.label for i in data.items]


def test_lambada_targets_the_last_space_separated_word():
    item = read_choice_file("lambada", MC / "lambada/lambada_test.jsonl").items[0]
    text = json.loads(lines(MC / "lambada/lambada_test.jsonl")[0])["text"]
    assert item.continuations == (" signs",) and item.contexts[0] + item.continuations[0] == text


def test_swag_json_rows_and_the_released_csv_give_the_same_items(tmp_path):
    rows = [json.loads(line) for line in lines(MC / "swag-sample.json")]
    from_json = read_choice_file("swag", MC / "swag-sample.json").items
    assert from_json[0].contexts[0] == f"{rows[0]['sent1']} {rows[0]['sent2']}"
    header = ["", "video-id", "fold-ind", "startphrase", "sent1", "sent2", "gold-source",
              "ending0", "ending1", "ending2", "ending3", "label"]
    with open(tmp_path / "val.csv", "w", newline="", encoding="utf-8") as handle:   # the released val.csv layout
        writer = csv.writer(handle)
        writer.writerow(header)
        for index, row in enumerate(rows):
            writer.writerow([index, "anetv_x", index, f"{row['sent1']} {row['sent2']}", row["sent1"], row["sent2"],
                             "gold", *(row[f"ending{i}"] for i in range(4)), row["label"]])
    from_csv = read_choice_file("swag", tmp_path / "val.csv").items
    key = lambda i: (i.contexts, i.continuations, i.label)  # noqa: E731
    assert [key(i) for i in from_csv] == [key(i) for i in from_json]


HELLASWAG_ROWS = [   # the released hellaswag_val.jsonl layout (int labels); the HF copy has string labels
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and jerk",
     "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
     "ctx_b": "the lady", "split": "val", "split_type": "zeroshot", "label": "0",
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
                 "stands and lifts the weight over her head."], "source_id": "activitynet~v_-lJS58hyo1c"},
    {"ind": 1000, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow tomatoes [title] Pick a spot.",
     "ctx_b": "", "split": "val", "split_type": "indomain", "label": 1,
     "endings": ["[step] Water daily.", "Choose a sunny place [substeps] with  shade."], "source_id": "wikihow~1"},
]


def test_hellaswag_rows_in_the_released_layout_are_cleaned_as_the_harness_does(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in HELLASWAG_ROWS))
    items = read_choice_file("hellaswag", path).items
    assert [i.id for i in items] == ["24", "92", "1000"] and [i.label for i in items] == [3, 0, 1]
    assert items[0].contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert items[1].contexts[0] == ("Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. "
                                    "The lady")
    assert items[2].contexts[0] == "Home and Garden: How to grow tomatoes. Pick a spot."
    # The harness strips before it removes the brackets, so "[step] Water daily." keeps a leading space.
    assert items[2].choices == (" Water daily.", "Choose a sunny place with shade.")
    assert items[2].continuations == ("  Water daily.", " Choose a sunny place with shade.")
    assert hellaswag_clean(" a [title] b [step] c  d ") == "a. b c d"


def test_a_byte_order_mark_does_not_cost_the_first_row(tmp_path):
    """Editors on Windows write a UTF-8 BOM: the first row is still read (it was skipped as invalid_json)."""
    for name in ("arc_easy/ARC-Easy-Dev.jsonl", "swag-sample.json"):
        path = tmp_path / Path(name).name
        path.write_bytes(b"\xef\xbb\xbf" + (MC / name).read_bytes())
        format = "arc" if name.startswith("arc") else "swag"
        data = read_choice_file(format, path)
        assert data.bad == [] and data.items == read_choice_file(format, MC / name).items


def corrupt(tmp_path: Path, name: str, edits: dict[int, str]) -> Path:
    """A copy of a real file with some lines (0-based) replaced."""
    rows = lines(MC / name)
    for index, text in edits.items():
        rows[index] = text
    path = tmp_path / Path(name).name
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def arc_row(index: int, **changes) -> str:
    row = json.loads(lines(MC / "arc_easy/ARC-Easy-Dev.jsonl")[index])
    for key, value in changes.items():
        if value is None:
            row.pop(key)
        else:
            row[key] = value
    return json.dumps(row)


def test_bad_rows_are_skipped_and_named_by_line_and_reason_and_good_rows_kept(tmp_path):
    empty_choice = json.loads(arc_row(3))
    empty_choice["question"]["choices"][1]["text"] = "  "
    path = corrupt(tmp_path, "arc_easy/ARC-Easy-Dev.jsonl", {
        0: arc_row(0, answerKey="Z"), 1: arc_row(1, answerKey=None), 2: "{not json",
        3: json.dumps(empty_choice), 4: arc_row(5), 6: "[1, 2]"})
    data = read_choice_file("arc", path)
    assert [(b.line, b.reason) for b in data.bad] == [
        (1, "label_out_of_range"), (2, "missing_field"), (3, "invalid_json"), (4, "empty_choice"),
        (6, "duplicate_id"), (7, "not_an_object")]
    assert all(b.path == str(path) and b.detail for b in data.bad)
    assert "'answerKey'" in data.bad[1].detail and "'Z'" in data.bad[0].detail
    assert len(data.items) == 570 - 6 and data.rows == 570


def test_winogrande_and_piqa_label_problems_are_counted(tmp_path):
    wino = corrupt(tmp_path, "winogrande/dev.jsonl", {
        0: json.dumps({**json.loads(lines(MC / "winogrande/dev.jsonl")[0]), "sentence": "no blank here"}),
        1: json.dumps({**json.loads(lines(MC / "winogrande/dev.jsonl")[1]), "answer": "2"}),
        2: json.dumps({**json.loads(lines(MC / "winogrande/dev.jsonl")[2]), "option2": ""})})
    data = read_choice_file("winogrande", wino, MC / "winogrande/dev-labels.lst")
    assert [(b.line, b.reason) for b in data.bad] == [(1, "no_blank"), (2, "label_mismatch"), (3, "empty_choice")]
    labels = tmp_path / "valid-labels.lst"
    labels.write_text("\n".join(["2", "x", *lines(MC / "piqa/valid-labels.lst")[2:]]) + "\n")
    piqa = read_choice_file("piqa", MC / "piqa/valid.jsonl", labels)
    assert [(b.line, b.reason) for b in piqa.bad] == [(1, "label_out_of_range"), (2, "invalid_label")]


def test_a_file_with_no_usable_row_fails_naming_the_file(tmp_path):
    path = tmp_path / "empty-choices.jsonl"
    path.write_text(arc_row(0, answerKey="Q") + "\n" + "{broken\n")
    with pytest.raises(DatasetError, match=r"empty-choices\.jsonl: no usable arc rows \(2 rows read; skipped: "
                                           r"invalid_json, label_out_of_range\)"):
        read_choice_file("arc", path)
    with pytest.raises(DatasetError, match=r"missing\.jsonl: file not found"):
        read_choice_file("arc", tmp_path / "missing.jsonl")


def test_labels_files_must_align_and_are_required_or_refused_by_format(tmp_path):
    short = tmp_path / "short.lst"
    short.write_text("0\n1\n")
    with pytest.raises(DatasetError, match=r"short\.lst: 2 labels for the 1838 rows of .*valid\.jsonl"):
        read_choice_file("piqa", MC / "piqa/valid.jsonl", short)
    with pytest.raises(DatasetError, match="piqa keeps its labels in a separate file"):
        read_choice_file("piqa", MC / "piqa/valid.jsonl")
    with pytest.raises(DatasetError, match="arc files carry their labels"):
        read_choice_file("arc", MC / "arc_easy/ARC-Easy-Dev.jsonl", short)
    with pytest.raises(DatasetError, match="unknown format 'mmlu'"):
        read_choice_file("mmlu", MC / "arc_easy/ARC-Easy-Dev.jsonl")


def test_every_format_has_a_reader_and_items_are_plain_data():
    assert set(FORMATS) == {"arc", "piqa", "hellaswag", "swag", "winogrande", "lambada"}
    item = ChoiceItem("x", 1, ("q",), (" a",), 0, ("a",))
    with pytest.raises(AttributeError):
        item.label = 1  # type: ignore[misc]
