"""Pieces of the stage runner that need no Prefect server."""
import json

import pytest

from flows.pipeline import StageSelectionError, select_stages
from flows.recipe import PipelineConfig
from flows.runner import _scratch_for_inputs


def test_scratch_survives_only_for_the_same_upstream_outputs(tmp_path):
    scratch = _scratch_for_inputs(tmp_path / "scratch", {"documents": "aaa"})
    (scratch / "checkpoint").write_text("resume me")
    assert (_scratch_for_inputs(scratch, {"documents": "aaa"}) / "checkpoint").exists()
    _scratch_for_inputs(scratch, {"documents": "bbb"})
    assert not (scratch / "checkpoint").exists()
    assert json.loads((scratch / "_inputs.json").read_text()) == {"documents": "bbb"}


def test_force_must_name_a_stage_this_run_executes():
    config = PipelineConfig.model_validate({"ingest": {"sources": [{"name": "w", "kind": "wiki_offline"}]},
                                            "tokenizer": {"vocab_size": 300}})
    assert select_stages(config, None, None, ["tokenizer"]) == ["ingest", "tokenizer"]
    with pytest.raises(StageSelectionError, match="--force ingest: not among the stages this run executes"):
        select_stages(config, ["tokenizer"], None, ["ingest"])
