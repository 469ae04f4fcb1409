"""Files between stages: each read back through its model, a wrong file fails naming file and field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from storage.formats import (FileFormatError, ModelSpec, PredictionRow, PretrainArtifacts, TaskMetrics,
                             read_predictions, write_predictions)

SPEC = {"arch": "gpt", "n_layer": 2, "n_head": 2, "d_model": 64, "d_mlp": 256, "seq_len": 64, "vocab_size": 300,
        "padded_vocab_size": 384, "special_tokens": {"<|endoftext|>": 299}}


def test_a_model_config_round_trips_and_a_wrong_one_names_the_field(tmp_path: Path) -> None:
    path = ModelSpec(**SPEC).write(tmp_path / "config.json")
    assert ModelSpec.read(path) == ModelSpec(**SPEC)
    path.write_text(json.dumps({**SPEC, "n_head": "two"}))
    with pytest.raises(FileFormatError, match=r"config.json: field 'n_head': Input should be a valid integer"):
        ModelSpec.read(path)
    path.write_text(json.dumps({**SPEC, "d_model": 65}))
    with pytest.raises(FileFormatError, match="d_model 65 is not divisible by n_head 2"):
        ModelSpec.read(path)
    path.write_text(json.dumps({**SPEC, "colour": "red"}))
    with pytest.raises(FileFormatError, match="field 'colour': unknown field"):
        ModelSpec.read(path)


def test_missing_and_broken_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match=r"nowhere.json: missing"):
        ModelSpec.read(tmp_path / "nowhere.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(FileFormatError, match=r"broken.json: not valid JSON"):
        ModelSpec.read(tmp_path / "broken.json")


def test_pretrain_artifacts_come_from_the_success_record() -> None:
    success = {"artifacts": {"final_checkpoint": "checkpoints/step-12", "model": SPEC}}
    artifacts = PretrainArtifacts.from_success(success, "stages/pretrain/abc/_SUCCESS.json")
    assert artifacts.model.vocab_size == 300 and artifacts.final_checkpoint == "checkpoints/step-12"
    with pytest.raises(FileFormatError, match=r"_SUCCESS.json \(artifacts\): field 'model.arch'"):
        PretrainArtifacts.from_success({"artifacts": {"final_checkpoint": "x", "model": {**SPEC, "arch": "rnn"}}},
                                       "stages/pretrain/abc/_SUCCESS.json")


def test_task_metrics_keep_their_order_refuse_non_finite_values_and_become_stats(tmp_path: Path) -> None:
    path = TaskMetrics({"exact": 71.5, "f1": 74.25}).write(tmp_path / "metrics.json")
    assert list(json.loads(path.read_text())) == ["exact", "f1"]
    assert TaskMetrics.read(path).stats("squad_v2") == {"squad_v2/exact": 71.5, "squad_v2/f1": 74.25}
    with pytest.raises(ValueError, match="not finite"):      # a writer cannot produce one
        TaskMetrics({"accuracy": float("nan")})
    path.write_text('{"accuracy": NaN}')
    with pytest.raises(FileFormatError, match=r"metrics.json: .*\['accuracy'\] are not finite"):
        TaskMetrics.read(path)


def test_predictions_round_trip_and_a_bad_line_is_named(tmp_path: Path) -> None:
    rows = [PredictionRow(id="q1", prediction="Denver Broncos", gold=["Denver Broncos", "Broncos"]),
            PredictionRow(id="s7", prediction=1, gold=0)]
    path = tmp_path / "predictions.jsonl"
    assert write_predictions(path, rows) == 2
    assert list(read_predictions(path)) == rows
    path.write_text(path.read_text() + '{"id": "s8", "prediction": 1}\n')
    with pytest.raises(FileFormatError, match=r"predictions.jsonl:3: field 'gold': Field required"):
        list(read_predictions(path))
