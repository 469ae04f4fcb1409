"""The stages of the pipeline, in order. Adding a stage is one module in `tasks/` and one line here.

Each stage package declares itself as `STAGE = storage.stage.Stage(...)`: name, VERSION, config
class, what it reads, whether the seed changes its output, `run`, and optional `external_inputs`.
The pipeline config, the plan and the catalog views are all derived from this list.
"""
from __future__ import annotations

from typing import Any

from pydantic import create_model

import tasks.curate
import tasks.dedup
import tasks.evaluate
import tasks.finetune
import tasks.ingest
import tasks.pretrain
import tasks.shard
import tasks.tokenizer
from storage.configbase import StrictModel
from storage.stage import Stage

REGISTRY: tuple[Stage, ...] = (
    tasks.ingest.STAGE,
    tasks.curate.STAGE,
    tasks.dedup.STAGE,
    tasks.tokenizer.STAGE,
    tasks.shard.STAGE,
    tasks.pretrain.STAGE,
    tasks.finetune.STAGE,
    tasks.evaluate.STAGE,
)
STAGES: dict[str, Stage] = {stage.name: stage for stage in REGISTRY}
PIPELINE_ORDER: list[str] = [stage.name for stage in REGISTRY]


def stage_configs_model(registry: tuple[Stage, ...]) -> type[StrictModel]:
    """One optional field per stage, in pipeline order; the pipeline config adds name, experiment and seed."""
    fields: dict[str, Any] = {stage.name: (stage.config | None, None) for stage in registry}
    model = create_model("StageConfigs", __base__=StrictModel, **fields)
    model.__doc__ = "One optional section per stage; a stage left out of the recipe does not run."
    return model


StageConfigs = stage_configs_model(REGISTRY)


def input_stages(stage: Stage, enabled: list[str], config: Any) -> dict[str, str]:
    """Input key -> the upstream stage that serves it: the last enabled stage before this one providing the key."""
    before = [STAGES[name] for name in enabled[: enabled.index(stage.name)]]
    required = stage.reads_for(config)
    mapping: dict[str, str] = {}
    for key in (*required, *stage.optional_reads):
        candidates = [upstream.name for upstream in before if key in upstream.keys]
        if candidates:
            mapping[key] = candidates[-1]
        elif key in required:
            providers = [s.name for s in REGISTRY if key in s.keys]
            raise ValueError(f"stage {stage.name!r} reads {key!r}, which no earlier stage of the recipe provides; "
                             f"add one of: {', '.join(providers)}")
    return mapping


def catalog_views() -> dict[str, list[tuple[str, str]]]:
    """View name -> (stage, glob under its output) for every stage that exposes Parquet to the catalog."""
    views: dict[str, list[tuple[str, str]]] = {}
    for stage in REGISTRY:
        for view, pattern in stage.catalog_views.items():
            views.setdefault(view, []).append((stage.name, pattern))
    return views
