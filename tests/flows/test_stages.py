"""The stage registry: every stage keeps the protocol, and the pipeline is derived from the list."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from pydantic import Field

from cliutil import REPO_ROOT
from flows.recipe import PipelineConfig
from flows.stages import REGISTRY, STAGES, catalog_views, input_stages, stage_configs_model
from storage.configbase import StrictModel
from storage.stage import Stage, StageContext, StageResult, deferred, stage_problems


@pytest.mark.parametrize("stage", REGISTRY, ids=lambda s: s.name)
def test_every_registered_stage_keeps_the_protocol(stage: Stage) -> None:
    assert stage_problems(stage) == []
    package = importlib.import_module(f"tasks.{stage.name}")
    assert package.STAGE is stage and package.VERSION == stage.version and package.run is stage.run
    module_name, function_name = stage.run.target.split(":")
    assert callable(getattr(importlib.import_module(module_name), function_name))
    assert stage.config.non_output_fields <= set(stage.config.model_fields), "non_output_fields names no field"
    earlier = REGISTRY[: REGISTRY.index(stage)]
    reads = () if callable(stage.reads) else stage.reads
    for key in reads + stage.optional_reads:
        assert any(key in upstream.keys for upstream in earlier), f"nothing before {stage.name} provides {key!r}"


def test_a_broken_declaration_fails_naming_every_problem() -> None:
    with pytest.raises(TypeError) as err:
        Stage(name="Bad Name", version="", config=dict, run=None, reads=["documents"])  # type: ignore[arg-type]
    message = str(err.value)
    for problem in ("name 'Bad Name'", "version must be", "config must be", "run must be", "reads must be"):
        assert problem in message


def test_deferred_run_imports_its_module_only_when_called() -> None:
    run = deferred("tasks.no_such_module:run")   # declaring it imports nothing
    with pytest.raises(ModuleNotFoundError, match="tasks.no_such_module"):
        run(None, None)
    with pytest.raises(ValueError, match="package.module:function"):
        deferred("no colon")


class ToyConfig(StrictModel):
    factor: int = Field(2, ge=1)


def toy_run(config: ToyConfig, ctx: StageContext) -> StageResult:
    return StageResult(stats={"factor": config.factor})


def test_adding_a_stage_is_one_declaration_and_one_registry_entry() -> None:
    toy = Stage(name="toy", version="1", config=ToyConfig, run=toy_run, reads=("shard",),
                catalog_views={"toy_rows": "*.parquet"})
    configs = stage_configs_model((*REGISTRY, toy))
    assert list(configs.model_fields)[-1] == "toy"
    parsed = configs.model_validate({"toy": {"factor": 3}})
    assert parsed.toy == ToyConfig(factor=3) and parsed.pretrain is None
    assert input_stages(toy, ["ingest", "tokenizer", "shard", "toy"], ToyConfig()) == {"shard": "shard"}


def test_the_pipeline_config_and_catalog_views_come_from_the_registry() -> None:
    assert list(PipelineConfig.model_fields)[: len(REGISTRY)] == [stage.name for stage in REGISTRY]
    views = catalog_views()
    assert views["documents"] == [("ingest", "**/*.parquet"), ("curate", "**/*.parquet"), ("dedup", "**/*.parquet")]
    assert views["token_shards"] == [("shard", "shards/*.parquet")]


def test_inputs_come_from_the_last_stage_that_provides_them() -> None:
    from tasks.shard import ShardConfig
    from tasks.tokenizer import TokenizerConfig

    enabled = ["ingest", "curate", "tokenizer", "shard"]
    assert input_stages(STAGES["shard"], enabled, ShardConfig()) == {"documents": "curate", "tokenizer": "tokenizer"}
    assert input_stages(STAGES["tokenizer"], enabled, TokenizerConfig()) == {"documents": "curate"}
    # a fixed tokenizer reads no documents, so every data variant of an ablation shares it
    assert input_stages(STAGES["tokenizer"], enabled, TokenizerConfig(pretrained="gpt2")) == {}
    with pytest.raises(ValueError, match="'shard' reads 'documents'.*add one of: ingest, curate, dedup"):
        input_stages(STAGES["shard"], ["tokenizer", "shard"], ShardConfig())
    with pytest.raises(ValueError, match="'tokenizer' reads 'documents'"):
        input_stages(STAGES["tokenizer"], ["tokenizer"], TokenizerConfig())


def test_validating_a_recipe_imports_neither_torch_nor_datatrove() -> None:
    code = ("import sys; from flows.recipe import load_recipe; load_recipe('configs/demo.yaml'); "
            "heavy = [m for m in ('torch', 'datatrove', 'spacy', 'mlflow', 'prefect') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
