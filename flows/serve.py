"""`lmforge serve`: Prefect deployments of recipes and grids, on their cron schedules, runnable from the UI.

For a recipe: the pipeline flow (its parameter, the recipe, is a form in the Prefect UI; the
recipe's `schedule:` becomes the deployment's cron schedule) and the single-stage flow (rerun one
stage after a change). For a grid: the ablation flow. Stopping `serve` leaves the schedules active
(`pause_on_shutdown=False`), so they resume when it is served again.

With `--pool NAME` the same deployments go to a Prefect work pool instead, and any process worker
polling it runs them (`prefect worker start --pool NAME`, on this machine or another). The worker
imports the flows from its installed lmforge (a module-path entrypoint: no code storage that only
this machine has) and runs them in the directory `serve` ran in, as `lmforge run` would.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from flows.ablate import ablation
from flows.ablation import expand, is_grid_file, load_grid
from flows.pipeline import pipeline
from flows.recipe import PipelineConfig, load_recipe

TAGS = ["lmforge"]


class PoolError(Exception):
    """`--pool` cannot deploy: no Prefect server to deploy to, or it does not answer."""


@flow(name="lmforge-stage", flow_run_name="{config.name}-{stage}", log_prints=True)
def stage_flow(config: PipelineConfig, stage: str, workspace: str = "./workspace",
               force: bool = True) -> list[dict[str, Any]]:
    """Reruns one stage of a recipe on the inputs already built (after a change to that stage)."""
    return pipeline(config=config, workspace=workspace, only=[stage], force=[stage] if force else None)


def recipe_deployments(config: PipelineConfig, workspace: Path,
                       options: dict[str, Any] | None = None) -> list[RunnerDeployment]:
    """The pipeline deployment (scheduled when the recipe says so) and the rerun-one-stage deployment."""
    options = options or {}
    params = {"config": config.model_dump(mode="json", exclude_none=True), "workspace": str(workspace)}
    schedules = [Cron(config.schedule.cron, timezone=config.schedule.timezone)] if config.schedule else None
    last_stage = config.enabled_stages()[-1]
    return [
        pipeline.to_deployment(name=config.name, parameters=params, schedules=schedules, tags=TAGS,
                               description=f"recipe {config.name}: every stage, cached where built", **options),
        stage_flow.to_deployment(name=config.name, parameters={**params, "stage": last_stage, "force": True},
                                 tags=TAGS, description=f"recipe {config.name}: rerun one stage", **options),
    ]


def grid_deployment(path: Path, workspace: Path, options: dict[str, Any] | None = None) -> RunnerDeployment:
    grid = load_grid(path)
    expand(grid)        # a missing base or a broken variant is named now, not in every scheduled run
    return ablation.to_deployment(name=grid.name, tags=TAGS, description=f"ablation grid {grid.name}",
                                  parameters={"grid": grid.model_dump(mode="json"), "workspace": str(workspace),
                                              "max_parallel": 1}, **(options or {}))


def pool_options(pool: str, working_dir: Path) -> dict[str, Any]:
    """What makes a deployment runnable by a process worker of `pool` on any machine with lmforge installed."""
    # A module path ("flows.pipeline.pipeline") is imported from the worker's installed lmforge; a file
    # path would need this checkout copied to the worker (code storage). Relative recipe paths resolve
    # in `working_dir`, as they do under `lmforge run` there.
    return {"work_pool_name": pool, "entrypoint_type": EntrypointType.MODULE_PATH,
            "job_variables": {"working_dir": str(working_dir)}}


def deployments(paths: list[Path], workspace: Path, pool: str | None = None) -> list[RunnerDeployment]:
    """Every deployment the given recipe and grid files make (for the work pool `pool`, if given)."""
    options = pool_options(pool, Path.cwd()) if pool else None
    made: list[RunnerDeployment] = []
    for path in paths:
        made += [grid_deployment(path, workspace, options)] if is_grid_file(path) else \
            recipe_deployments(load_recipe(path), workspace, options)
    return made


def serve_deployments(made: list[RunnerDeployment]) -> None:
    """Serves the deployments until interrupted; their schedules stay active afterwards."""
    serve(*made, pause_on_shutdown=False)


def prefect_server_url() -> str:
    """The Prefect API that workers share; a temporary in-process server would vanish with `serve`."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise PoolError("--pool needs a Prefect server that the workers reach too: set PREFECT_API_URL "
                        "(or start `lmforge ui` for this workspace)")
    return url


def ensure_pool(name: str) -> bool:
    """Creates the work pool `name` as a `process` pool unless it exists; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=ProcessWorker.type, base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:       # another `serve --pool` created it meanwhile
            return False
    return True


def deploy_to_pool(made: list[RunnerDeployment], pool: str, workspace: Path) -> str:
    """Creates or updates the deployments on the work pool `pool` (made if missing); returns what to tell the user."""
    import httpx

    from storage.tracking import redact_uri

    url = redact_uri(prefect_server_url())
    try:
        created = ensure_pool(pool)
        for deployment in made:
            deployment.apply(work_pool_name=pool)      # by flow and deployment name: a rerun updates it
    except (httpx.HTTPError, OSError) as err:
        raise PoolError(f"the Prefect server at {url} (PREFECT_API_URL) does not answer: {err}") from err
    lines = [f"created work pool {pool!r} (type process)"] if created else []
    lines.append(f"deployed to work pool {pool!r} on {url}, for workspace {workspace}:")
    for deployment in made:
        crons = ", ".join(f"cron {s.schedule.cron} ({s.schedule.timezone})" for s in deployment.schedules or [])
        lines.append(f"  {deployment.flow_name}/{deployment.name}  {crons or 'run on demand'}")
    lines += [(f"start a worker on each machine that runs them (lmforge installed; the workspace and {Path.cwd()} "
               "at the same paths):"),
              f"  PREFECT_API_URL={url} prefect worker start --pool {pool}",
              ("runs start on schedule, from the Prefect UI's Run button, or with "
               f"`prefect deployment run '{made[0].flow_name}/{made[0].name}'`")]
    return "\n".join(lines)
