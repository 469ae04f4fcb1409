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


def test_a_run_stopped_while_its_records_open_ends_killed_with_every_nested_run(tmp_path, monkeypatch):
    """SIGTERM (SystemExit) or Ctrl-C can land while the run's or a stage's records are being opened; the catalog
    row and every MLflow run still end KILLED, none stays `running` until the next start marks it."""
    from cliutil import catalog_rows
    from mlflow.tracking import MlflowClient

    from flows.pipeline import finish_pipeline_run, pipeline, start_pipeline_run
    from storage.catalog import Catalog
    from storage.workspace import Workspace

    ws = tmp_path / "ws"
    config = PipelineConfig.model_validate({"ingest": {"sources": [{"name": "w", "kind": "wiki_offline"}]}})
    recorded = Catalog.start_pipeline

    def row_then_signal(self, *args):
        recorded(self, *args)
        raise KeyboardInterrupt      # arrives just after the row is written, before the stages start

    monkeypatch.setattr(Catalog, "start_pipeline", row_then_signal)
    with pytest.raises(KeyboardInterrupt):
        pipeline.fn(config=config, workspace=str(ws))
    monkeypatch.undo()
    assert catalog_rows(ws, "select status from pipeline_runs") == [("killed",)]
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lmforge").experiment_id
    assert [r.info.status for r in client.search_runs([experiment])] == ["KILLED"]

    info = start_pipeline_run(config, Workspace(ws))
    stage_run = info.tracker.start_run("ingest", tags={"lmforge.stage": "ingest"}, parent_run_id=info.parent_mlflow_run_id)
    finish_pipeline_run(info, "killed")       # the stage was stopped before its own records could end it
    assert client.get_run(stage_run).info.status == "KILLED"
    assert client.get_run(info.parent_mlflow_run_id).info.status == "KILLED"


def test_an_output_records_the_upstream_it_was_built_from_not_one_rebuilt_meanwhile(tmp_path):
    """`--force tokenizer` in another process while shard builds: shard was made from the old tokenizer, so it
    must be stale afterwards, not fresh because the new tokenizer's digest was read at commit time."""
    from types import SimpleNamespace

    from flows.plan import PlannedStage, is_fresh
    from flows.runner import _commit
    from storage.stage import StageContext, StageResult
    from storage.workspace import Workspace

    ws = Workspace.at(tmp_path / "ws")
    ws.commit("tokenizer", "tok", ws.new_temp_dir("tokenizer", "tok"), {})
    built_from = {"tokenizer": ws.read_success("tokenizer", "tok")["output_digest"]}
    config = PipelineConfig.model_validate({"ingest": {"sources": [{"name": "w", "kind": "wiki_offline"}]},
                                            "tokenizer": {"vocab_size": 300}, "shard": {}}).shard
    stage = PlannedStage("shard", "pending", "shd", config, {"tokenizer": "tokenizer"}, {"tokenizer": "tok"},
                         dict(built_from))
    ctx = StageContext("shard", "shd", ws.new_temp_dir("shard", "shd"), tmp_path / "scratch", {}, ws.root)
    tmp = ws.new_temp_dir("tokenizer", "tok")
    (tmp / "tokenizer.tiktoken").write_text("a different vocabulary")
    ws.commit("tokenizer", "tok", tmp, {})                       # the concurrent --force tokenizer
    now = {"tokenizer": ws.read_success("tokenizer", "tok")["output_digest"]}
    assert now != built_from
    _commit(stage, SimpleNamespace(workspace=ws, seed=0, run_id="r"), ctx, StageResult(), 0.0)
    assert ws.read_success("shard", "shd")["input_digests"] == built_from
    assert not is_fresh(ws, "shard", "shd", now)
