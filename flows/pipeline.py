"""The Prefect flow: plan the stages, run each as a cached task, record the run in the catalog and MLflow."""
from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem

from flows import terminal
from flows.plan import PlannedStage, enabled_stages, is_fresh, make_plan
from flows.recipe import PipelineConfig
from flows.runner import RunInfo, execute_stage, metric_safe, record_cached_stage
from flows.stages import STAGES
from storage.catalog import Catalog
from storage.telemetry import disable_telemetry
from storage.tracking import Tracker
from storage.workspace import Workspace

disable_telemetry()


class StageSelectionError(ValueError):
    """`--only`, `--until` or `--force` names a stage that cannot be run that way."""


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The fingerprint (and output digest) when `_SUCCESS.json` says the stage is fresh; else no caching.

    `_SUCCESS.json` is the source of truth: a deleted or second workspace never looks cached.
    """
    if parameters["force"]:
        return None
    ws = Workspace(Path(parameters["workspace"]))
    name, fp = parameters["stage"], parameters["fingerprint"]
    if not is_fresh(ws, name, fp, parameters["input_digests"]):
        return None
    return f"lmforge-{name}-{fp}-{ws.read_success(name, fp)['output_digest'][:16]}"


@task(name="stage", task_run_name="{stage}-{fingerprint}", cache_key_fn=stage_cache_key, persist_result=True,
      result_serializer="json")
def stage_task(stage: str, fingerprint: str, workspace: str, input_digests: dict[str, str], force: bool,
               planned: PlannedStage, info: RunInfo) -> dict[str, Any]:
    """One stage as a Prefect task; a cache hit returns the outcome of the run that built it."""
    return execute_stage(planned, info, force)


def select_stages(config: PipelineConfig, only: list[str] | None, until: str | None,
                  force: list[str] | None) -> list[str]:
    """The enabled stages that this run executes, in order."""
    enabled = enabled_stages(config)
    for name in [*(only or []), *([until] if until else []), *(force or [])]:
        if name not in enabled:
            raise StageSelectionError(f"stage {name!r} is not in this recipe (its stages: {', '.join(enabled)})")
    selected = [s for s in enabled if not only or s in only]
    if until:
        selected = [s for s in selected if enabled.index(s) <= enabled.index(until)]
    unselected_forced = [s for s in force or [] if s not in selected]
    if unselected_forced:
        raise StageSelectionError(f"--force {', '.join(unselected_forced)}: not among the stages this run executes "
                                  f"({', '.join(selected)})")
    return selected


@flow(name="lmforge-pipeline", flow_run_name="{config.name}", log_prints=True)
def pipeline(config: PipelineConfig, workspace: str = "./workspace", only: list[str] | None = None,
             until: str | None = None, force: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the recipe's stages; finished stages are reused, `force` recomputes the named ones."""
    ws = Workspace.at(workspace)
    selected = select_stages(config, only, until, force)
    started: list[RunInfo] = []
    try:
        info = start_pipeline_run(config, ws, started)
        outcomes = _run_stages(config, ws, selected, set(force or []), info)
        log_headlines(info, outcomes)
        publish_run_links(info, config)
    except BaseException as err:
        if started:     # a SIGTERM while the run's records were being opened ends them too
            finish_pipeline_run(started[0], "failed" if isinstance(err, Exception) else "killed")
        raise
    finish_pipeline_run(info, "finished")
    return outcomes


def _run_stages(config: PipelineConfig, ws: Workspace, selected: list[str], force: set[str],
                info: RunInfo) -> list[dict[str, Any]]:
    with ws.init_lock():
        storage = result_storage(ws)
    outcomes = []
    for planned in make_plan(config, ws):
        if planned.name not in selected:
            continue
        if planned.borrowed_from and not ws.is_done(planned.name, planned.fingerprint):
            build_borrowed(planned, ws)
        planned.input_digests = _upstream_digests(planned, ws)
        with stage_view(planned, info) as line:
            result = stage_task.with_options(result_storage=storage)(
                planned.name, planned.fingerprint, str(ws.root), planned.input_digests, planned.name in force,
                planned, info)
            if result["executed_in"] != info.run_id or result["cached"]:
                record_cached_stage(planned, info)
                result = {**result, "cached": True}
            line.cached = result["cached"]
            line.headline = STAGES[planned.name].headline_stats(ws.read_success(planned.name, planned.fingerprint)["stats"])
        outcomes.append({**result, "run_id": info.run_id, "mlflow_run_id": info.parent_mlflow_run_id})
    return outcomes


@contextlib.contextmanager
def stage_view(planned: PlannedStage, info: RunInfo) -> Iterator[terminal.StageLine]:
    """The CLI's live line for the stage (its output captured to a log file), or a plain printed line."""
    view = terminal.active()
    if view is not None:
        log = info.workspace.root / "logs" / info.run_id / f"{planned.name}.log"
        with view.stage(planned.name, planned.fingerprint, info.workspace.scratch_dir(planned.name,
                                                                                     planned.fingerprint), log) as line:
            yield line
        return
    line = terminal.StageLine(planned.name, planned.fingerprint)
    yield line
    print(f"{planned.name:<10} {planned.fingerprint}  {'cached' if line.cached else 'built'}  "
          f"{terminal.headline_text(line.headline)}")


def build_borrowed(planned: PlannedStage, ws: Workspace) -> None:
    """A `from_recipe` stage not built yet: run that recipe up to it (a nested pipeline run), once."""
    from flows.recipe import load_recipe

    print(f"{planned.name:<10} {planned.fingerprint}  from {planned.borrowed_from}: building it there first")
    pipeline(config=load_recipe(planned.borrowed_from), workspace=str(ws.root), until=planned.name)


def result_storage(ws: Workspace) -> LocalFileSystem:
    """Prefect's task results live inside the workspace (Prefect wants the block saved server-side)."""
    import hashlib

    block = LocalFileSystem(basepath=str(ws.root / "prefect-results"))
    block.save(f"lmforge-results-{hashlib.sha256(str(ws.root).encode()).hexdigest()[:12]}", overwrite=True)
    return block


def _upstream_digests(planned: PlannedStage, ws: Workspace) -> dict[str, str]:
    """Digests of the upstream outputs as they are now; an unbuilt upstream is an error (for `--only`)."""
    digests = {}
    for key, upstream in planned.inputs.items():
        fp = planned.input_fingerprints[key]
        if not ws.is_done(upstream, fp):
            raise StageSelectionError(f"stage {planned.name!r} needs {upstream!r} ({fp}), which is not built: "
                                      f"run it first or include it in --only")
        digests[key] = ws.read_success(upstream, fp)["output_digest"]
    return digests


def start_pipeline_run(config: PipelineConfig, ws: Workspace, started: list[RunInfo] | None = None) -> RunInfo:
    """Marks runs that died by SIGKILL, then opens the MLflow parent run and the catalog row.

    The run is appended to `started` as soon as its MLflow run exists, so a signal or an error while the rest
    is recorded still lets the caller end it.
    """
    catalog, tracker = open_stores(ws, config.experiment)
    mark_dead_runs(catalog, tracker)
    run_id = uuid.uuid4().hex[:16]
    tags = {"lmforge.run_id": run_id, "lmforge.recipe": config.name, "lmforge.pid": str(os.getpid()),
            "lmforge.host": socket.gethostname(), "lmforge.workspace": str(ws.root), **ablation_tags(config)}
    params = config.model_dump(mode="json", exclude_none=True, exclude={"ablation"})
    parent = tracker.start_run(config.name, tags=tags)
    info = RunInfo(run_id, ws, tracker, catalog, parent, config.seed)
    if started is not None:
        started.append(info)
    tracker.log_params(parent, params)
    if config.ablation is not None:
        # the variant's own changes, so MLflow's compare view lines variants up by what differs
        tracker.log_params(parent, {f"override.{key}": value for key, value in config.ablation.overrides.items()})
        tag = config.ablation
        catalog.record_ablation(tag.grid, tag.variant, tag.position, tag.seed, run_id)
    catalog.start_pipeline(run_id, config.name, os.getpid(), config.model_dump_json(exclude_none=True), parent,
                           _prefect_flow_run_id())
    return info


def ablation_tags(config: PipelineConfig) -> dict[str, str]:
    if config.ablation is None:
        return {}
    return {"lmforge.ablation": config.ablation.grid, "lmforge.variant": config.ablation.variant,
            "lmforge.seed": str(config.ablation.seed)}


def open_stores(ws: Workspace, experiment: str) -> tuple[Catalog, Tracker]:
    """The catalog and the MLflow experiment, created under the workspace's init lock on first use."""
    with ws.init_lock():
        return Catalog(ws.catalog_path), Tracker(ws.root, experiment)


def log_headlines(info: RunInfo, outcomes: list[dict[str, Any]]) -> None:
    """Every stage's headline counters copied onto the pipeline's parent run, as `<stage>/<counter>`."""
    metrics = {}
    for outcome in outcomes:
        stats = info.workspace.read_success(outcome["stage"], outcome["fingerprint"]).get("stats", {})
        metrics.update({f"{outcome['stage']}/{name}": value
                        for name, value in STAGES[outcome["stage"]].headline_stats(stats).items()})
    info.tracker.log_metrics(info.parent_mlflow_run_id, metric_safe(metrics))


def publish_run_links(info: RunInfo, config: PipelineConfig) -> None:
    """A Prefect markdown artifact linking this run's MLflow runs (the UI `lmforge ui` serves)."""
    from prefect.artifacts import create_markdown_artifact

    from flows.ui import mlflow_ui_url

    base = f"{mlflow_ui_url(info.workspace.root)}/#/experiments/{info.tracker.experiment_id}/runs"
    children = info.tracker.client.search_runs([info.tracker.experiment_id],
                                               f"tags.mlflow.parentRunId = '{info.parent_mlflow_run_id}'")
    lines = [f"# {config.name}: MLflow runs", "", f"- pipeline run: [{info.parent_mlflow_run_id}]"
             f"({base}/{info.parent_mlflow_run_id})"]
    lines += [f"- {run.data.tags.get('lmforge.stage', run.info.run_name)}: [{run.info.run_id}]({base}/{run.info.run_id})"
              for run in children]
    create_markdown_artifact("\n".join(lines), key="mlflow-runs", description=f"{config.name}: links to MLflow")


def finish_pipeline_run(info: RunInfo, status: str) -> None:
    """The run's catalog row, its stage rows still `running` and its MLflow runs (nested ones too) end `status`."""
    info.catalog.finish_pipeline(info.run_id, status)
    info.catalog.mark_stale_stages(info.run_id, status if status != "finished" else "failed")
    if status != "finished":     # a stage stopped while its records were being opened
        info.tracker.end_running_children(info.parent_mlflow_run_id, status.upper())
    info.tracker.end_run(info.parent_mlflow_run_id, status.upper())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def mark_dead_runs(catalog: Catalog, tracker: Tracker) -> None:
    """Runs whose process on this host is gone (SIGKILL) are marked killed, in the catalog and MLflow."""
    host = socket.gethostname()
    for run_id, pid, run_host in catalog.running_pipelines():
        if run_host == host and pid is not None and not pid_alive(pid):
            catalog.finish_pipeline(run_id, "killed")
            catalog.mark_stale_stages(run_id, "killed")
    tracker.mark_dead_runs(lambda tags: tags.get("lmforge.host") == host and "lmforge.pid" in tags
                           and not pid_alive(int(tags["lmforge.pid"])))


def _prefect_flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else None
