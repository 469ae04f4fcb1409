"""The SQuAD loader on every real SQuAD file in ../shared/data/squad, and on broken copies."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.datasets import DatasetError, read_squad

SQUAD = (Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "squad").resolve()
SQUAD_FILES = sorted(SQUAD.rglob("*.json"))


def question_count(path: Path) -> int:
    """Questions counted without the loader: `qas` of the nested format, rows of the flat one."""
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    return sum(len(p["qas"]) for a in data for p in a["paragraphs"]) if "paragraphs" in data[0] else len(data)


@pytest.mark.parametrize("path", SQUAD_FILES, ids=lambda p: p.name)
def test_every_real_squad_file_yields_its_questions(path):
    examples = read_squad(path)
    assert len(examples) == question_count(path) > 0
    for example in examples:
        assert example.question.strip() and example.context.strip()
        assert example.is_impossible == (not example.answers)
        for answer in example.answers:   # SQuAD's offsets point at the answer text
            assert example.context[answer.start:answer.start + len(answer.text)] == answer.text, example.id


def test_known_counts():
    v11 = read_squad(SQUAD / "dev-v1.1-first2articles.json")
    assert len(v11) == 1057 and {e.title for e in v11} == {"Super_Bowl_50", "Warsaw"}
    assert not any(e.is_impossible for e in v11)
    v2 = read_squad(SQUAD / "dev-v2.0-subset.json")
    assert len(v2) == 626 and sum(e.is_impossible for e in v2) == 333
    flat = read_squad(SQUAD / "sample-flat.json")
    assert flat[0].question == "In what country is Normandy located?" and flat[0].answers[0].text == "France"


def test_a_malformed_file_names_the_file_and_the_json_location(tmp_path):
    data = json.loads((SQUAD / "dev-v2.0-tiny.json").read_text())
    del data["data"][0]["paragraphs"][0]["qas"][1]["question"]
    (tmp_path / "missing.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"missing.json: data\[0\].paragraphs\[0\].qas\[1\]: missing 'question'"):
        read_squad(tmp_path / "missing.json")
    data = json.loads((SQUAD / "sample-flat.json").read_text())
    data["data"][2]["answers"]["answer_start"] = ["159"] * len(data["data"][2]["answers"]["text"])
    (tmp_path / "flat.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"flat.json: data\[2\].answers\[0\].answer_start: expected int, found str"):
        read_squad(tmp_path / "flat.json")
    data = json.loads((SQUAD / "sample-flat.json").read_text())
    data["data"][1]["id"] = data["data"][0]["id"]
    (tmp_path / "twice.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="twice.json: question id '56ddde6b9a695914005b9628' appears more than once"):
        read_squad(tmp_path / "twice.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DatasetError, match="broken.json: not valid JSON"):
        read_squad(tmp_path / "broken.json")
