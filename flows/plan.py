"""The plan: every stage's fingerprint and whether its output is cached, pending, or not in the recipe."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flows.recipe import PipelineConfig
from flows.stages import PIPELINE_ORDER, STAGES, input_stages
from storage.configbase import StrictModel
from storage.fingerprint import fingerprint
from storage.workspace import Workspace

CACHED, PENDING, NOT_IN_RECIPE = "cached", "pending", "not in recipe"


@dataclass
class PlannedStage:
    name: str
    status: str
    fingerprint: str | None = None
    config: StrictModel | None = None
    inputs: dict[str, str] = field(default_factory=dict)              # input key -> upstream stage
    input_fingerprints: dict[str, str] = field(default_factory=dict)  # input key -> upstream fingerprint
    input_digests: dict[str, str] = field(default_factory=dict)       # input key -> upstream output digest, if built
    borrowed_from: str | None = None                                  # the recipe whose stage this is (from_recipe)


def enabled_stages(config: PipelineConfig) -> list[str]:
    return config.enabled_stages()


def stage_fingerprint(name: str, section: StrictModel, input_fps: dict[str, str], seed: int) -> str:
    stage = STAGES[name]
    extra: dict[str, Any] = {}
    if stage.external_inputs is not None:
        extra["files"] = stage.external_inputs(section)
    if stage.seed_matters(section):
        extra["seed"] = seed
    return fingerprint(name, stage.version, section.output_fields(), input_fps, extra)


def make_plan(config: PipelineConfig, workspace: Workspace, _borrowing: tuple[str, ...] = ()) -> list[PlannedStage]:
    """Fingerprints every enabled stage in order; a stage is cached only if its inputs are cached too."""
    enabled = enabled_stages(config)
    planned: dict[str, PlannedStage] = {}
    for name in PIPELINE_ORDER:
        if name not in enabled:
            planned[name] = PlannedStage(name, NOT_IN_RECIPE)
            continue
        section = getattr(config, name)
        if getattr(section, "from_recipe", None):
            planned[name] = borrowed_stage(name, section.from_recipe, workspace, _borrowing)
            continue
        planned[name] = _plan_stage(name, section, planned, enabled, config.seed, workspace)
    return list(planned.values())


def borrowed_stage(name: str, recipe: str, workspace: Workspace, borrowing: tuple[str, ...]) -> PlannedStage:
    """`<stage>.from_recipe`: exactly the stage that recipe plans (fingerprint, config and inputs), so
    every recipe naming it shares one output. Its upstream outputs must be built (`lmforge ablate`
    builds them first; `lmforge run` says which recipe to run)."""
    from flows.recipe import RecipeError, load_recipe

    if recipe in borrowing:
        raise RecipeError(f"{name}.from_recipe: {' -> '.join((*borrowing, recipe))} refers back to itself")
    other = load_recipe(recipe)
    if getattr(other, name, None) is None:
        raise RecipeError(f"{name}.from_recipe: {recipe} has no {name} stage")
    stage = next(s for s in make_plan(other, workspace, (*borrowing, recipe)) if s.name == name)
    stage.borrowed_from = recipe
    return stage


def _plan_stage(name: str, section: StrictModel, planned: dict[str, PlannedStage], enabled: list[str],
                seed: int, workspace: Workspace) -> PlannedStage:
    inputs = input_stages(STAGES[name], enabled, section)
    input_fps = {key: planned[up].fingerprint for key, up in inputs.items()}
    fp = stage_fingerprint(name, section, input_fps, seed)
    stage = PlannedStage(name, PENDING, fp, section, inputs, input_fps)
    if all(planned[up].status == CACHED for up in inputs.values()):
        stage.input_digests = {key: workspace.read_success(up, input_fps[key])["output_digest"]
                               for key, up in inputs.items()}
        if is_fresh(workspace, name, fp, stage.input_digests):
            stage.status = CACHED
    return stage


def is_fresh(workspace: Workspace, stage: str, fp: str, input_digests: dict[str, str]) -> bool:
    """Done, and built from exactly the upstream outputs that exist now."""
    if not workspace.is_done(stage, fp):
        return False
    return workspace.read_success(stage, fp).get("input_digests", {}) == input_digests
