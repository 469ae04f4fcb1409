"""`lmforge serve`: Prefect deployments of recipes and grids, on their cron schedules, runnable from the UI.

For a recipe: the pipeline flow (its parameter, the recipe, is a form in the Prefect UI; the
recipe's `schedule:` becomes the deployment's cron schedule) and the single-stage flow (rerun one
stage after a change). For a grid: the ablation flow. Stopping `serve` leaves the schedules active
(`pause_on_shutdown=False`), so they resume when it is served again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, serve
from prefect.schedules import Cron

from flows.ablate import ablation
from flows.ablation import is_grid_file, load_grid
from flows.pipeline import pipeline
from flows.recipe import PipelineConfig, load_recipe

TAGS = ["lmforge"]


@flow(name="lmforge-stage", flow_run_name="{config.name}-{stage}", log_prints=True)
def stage_flow(config: PipelineConfig, stage: str, workspace: str = "./workspace",
               force: bool = True) -> list[dict[str, Any]]:
    """Reruns one stage of a recipe on the inputs already built (after a change to that stage)."""
    return pipeline(config=config, workspace=workspace, only=[stage], force=[stage] if force else None)


def recipe_deployments(config: PipelineConfig, workspace: Path) -> list[Any]:
    """The pipeline deployment (scheduled when the recipe says so) and the rerun-one-stage deployment."""
    params = {"config": config.model_dump(mode="json", exclude_none=True), "workspace": str(workspace)}
    schedules = [Cron(config.schedule.cron, timezone=config.schedule.timezone)] if config.schedule else None
    last_stage = config.enabled_stages()[-1]
    return [
        pipeline.to_deployment(name=config.name, parameters=params, schedules=schedules, tags=TAGS,
                               description=f"recipe {config.name}: every stage, cached where built"),
        stage_flow.to_deployment(name=config.name, parameters={**params, "stage": last_stage, "force": True},
                                 tags=TAGS, description=f"recipe {config.name}: rerun one stage"),
    ]


def grid_deployment(path: Path, workspace: Path) -> Any:
    grid = load_grid(path)
    return ablation.to_deployment(name=grid.name, tags=TAGS, description=f"ablation grid {grid.name}",
                                  parameters={"grid": grid.model_dump(mode="json"), "workspace": str(workspace),
                                              "max_parallel": 1})


def deployments(paths: list[Path], workspace: Path) -> list[Any]:
    """Every deployment the given recipe and grid files make."""
    made: list[Any] = []
    for path in paths:
        made += [grid_deployment(path, workspace)] if is_grid_file(path) else \
            recipe_deployments(load_recipe(path), workspace)
    return made


def serve_deployments(made: list[Any]) -> None:
    """Serves the deployments until interrupted; their schedules stay active afterwards."""
    serve(*made, pause_on_shutdown=False)
