"""Executes one planned stage under the stage contract: temp dir, run, atomic commit, catalog, MLflow."""
from __future__ import annotations

import re
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.plan import PlannedStage, is_fresh
from flows.stages import STAGES
from storage.catalog import Catalog, update_stage, utcnow
from storage.stage import StageContext, StageResult
from storage.tracking import Tracker
from storage.workspace import Workspace

METRIC_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


@dataclass(frozen=True)
class RunInfo:
    """What every stage of one pipeline run shares."""

    run_id: str
    workspace: Workspace
    tracker: Tracker
    catalog: Catalog
    parent_mlflow_run_id: str
    seed: int


def outcome(stage: PlannedStage, workspace: Workspace, run_id: str, cached: bool) -> dict[str, Any]:
    """The small JSON result a stage task returns (paths and fingerprints, never data)."""
    success = workspace.read_success(stage.name, stage.fingerprint)
    return {"stage": stage.name, "fingerprint": stage.fingerprint, "cached": cached, "executed_in": run_id,
            "output_dir": str(workspace.stage_dir(stage.name, stage.fingerprint)),
            "output_digest": success["output_digest"]}


def execute_stage(stage: PlannedStage, info: RunInfo, force: bool) -> dict[str, Any]:
    """Runs the stage unless its output is fresh (or forced); returns its outcome.

    The stage lock makes a second pipeline that needs the same output wait, then reuse it.
    """
    ws = info.workspace
    with ws.lock(stage.name, stage.fingerprint):
        if not force and is_fresh(ws, stage.name, stage.fingerprint, stage.input_digests):
            return outcome(stage, ws, info.run_id, cached=True)
        _build(stage, info)
    return outcome(stage, ws, info.run_id, cached=False)


def _build(stage: PlannedStage, info: RunInfo) -> None:
    started = time.time()
    mlflow_run_id = _start_stage_records(stage, info)
    ctx = _make_context(stage, info, mlflow_run_id)
    try:
        result = STAGES[stage.name].run(stage.config, ctx)
        _commit(stage, info, ctx, result, time.time() - started)
    except BaseException as err:
        shutil.rmtree(ctx.output, ignore_errors=True)
        _fail_stage_records(stage, info, mlflow_run_id, err, time.time() - started)
        raise
    _finish_stage_records(stage, info, mlflow_run_id, result, time.time() - started)


def _make_context(stage: PlannedStage, info: RunInfo, mlflow_run_id: str) -> StageContext:
    ws = info.workspace
    ws.clean_temp_dirs(stage.name, stage.fingerprint)
    scratch = _scratch_for_inputs(ws.scratch_dir(stage.name, stage.fingerprint), stage.input_digests)
    inputs = {key: ws.stage_dir(up, stage.input_fingerprints[key]) for key, up in stage.inputs.items()}
    return StageContext(stage.name, stage.fingerprint, ws.new_temp_dir(stage.name, stage.fingerprint), scratch,
                        inputs, ws.root, info.seed, info.tracker.uri, mlflow_run_id)


def _scratch_for_inputs(scratch: Path, input_digests: dict[str, str]) -> Path:
    """Resume state is kept only if it was made from the same upstream outputs as now."""
    import json

    marker = scratch / "_inputs.json"
    if marker.is_file() and json.loads(marker.read_text()) != input_digests:
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(input_digests, sort_keys=True))
    return scratch


def _commit(stage: PlannedStage, info: RunInfo, ctx: StageContext, result: StageResult, wall_s: float) -> None:
    # the upstream outputs it was built from, not those there now: an upstream rebuilt meanwhile (`--force` in
    # another process) must leave this output stale, never fresh
    record = {"config": stage.config.model_dump(mode="json"), "input_stages": stage.inputs,
              "input_fingerprints": stage.input_fingerprints,
              "input_digests": dict(stage.input_digests), "stats": result.stats,
              "bad_inputs": result.bad_inputs, "artifacts": result.artifacts, "wall_s": wall_s, "seed": info.seed,
              "run_id": info.run_id}
    info.workspace.commit(stage.name, stage.fingerprint, ctx.output, record, STAGES[stage.name].digest_ignores)
    shutil.rmtree(ctx.scratch, ignore_errors=True)  # resume state is only for crashed attempts


def _start_stage_records(stage: PlannedStage, info: RunInfo) -> str:
    tags = {"lmforge.stage": stage.name, "lmforge.fingerprint": stage.fingerprint, "lmforge.cached": "false",
            **{f"lmforge.input.{k}": v for k, v in stage.input_fingerprints.items()}, **_process_tags()}
    mlflow_run_id = info.tracker.start_run(stage.name, stage.config.model_dump(mode="json"), tags,
                                           parent_run_id=info.parent_mlflow_run_id)
    _log_dataset_inputs(stage, info, mlflow_run_id)
    info.catalog.record_stage({"run_id": info.run_id, "stage": stage.name, "fingerprint": stage.fingerprint,
                               "status": "running", "cached": False, "started_at": utcnow(),
                               "input_fingerprints": _json(stage.input_fingerprints), "mlflow_run_id": mlflow_run_id,
                               "output_dir": str(info.workspace.stage_dir(stage.name, stage.fingerprint))})
    return mlflow_run_id


def _finish_stage_records(stage: PlannedStage, info: RunInfo, mlflow_run_id: str, result: StageResult,
                          wall_s: float) -> None:
    info.catalog.record_stats(stage.fingerprint, stage.name, result.stats)
    update_stage(info.catalog, info.run_id, stage.name, status="finished", finished_at=utcnow(), wall_s=wall_s)
    info.tracker.log_metrics(mlflow_run_id, {**metric_safe(result.stats), "wall_s": wall_s})
    info.tracker.end_run(mlflow_run_id, "FINISHED")
    publish_stats_artifact(stage.name, stage.fingerprint, result.stats)
    publish_training_artifact(stage.name, stage.fingerprint, info.workspace.stage_dir(stage.name, stage.fingerprint))


def _fail_stage_records(stage: PlannedStage, info: RunInfo, mlflow_run_id: str, err: BaseException,
                        wall_s: float) -> None:
    status = "failed" if isinstance(err, Exception) else "killed"
    message = "".join(traceback.format_exception_only(type(err), err)).strip()[-2000:]
    update_stage(info.catalog, info.run_id, stage.name, status=status, finished_at=utcnow(), wall_s=wall_s,
                 error=message)
    info.tracker.set_tags(mlflow_run_id, {"lmforge.error": message[:500]})
    info.tracker.end_run(mlflow_run_id, status.upper())


def record_cached_stage(stage: PlannedStage, info: RunInfo) -> None:
    """A reused stage still gets its catalog row and nested MLflow run, marked cached."""
    success = info.workspace.read_success(stage.name, stage.fingerprint)
    tags = {"lmforge.stage": stage.name, "lmforge.fingerprint": stage.fingerprint, "lmforge.cached": "true",
            "lmforge.executed_in": str(success.get("run_id"))}
    mlflow_run_id = info.tracker.start_run(stage.name, stage.config.model_dump(mode="json"), tags,
                                           parent_run_id=info.parent_mlflow_run_id)
    info.tracker.log_metrics(mlflow_run_id, metric_safe(success.get("stats", {})))
    info.tracker.end_run(mlflow_run_id, "FINISHED")
    info.catalog.record_stats(stage.fingerprint, stage.name, success.get("stats", {}))
    now = utcnow()
    info.catalog.record_stage({"run_id": info.run_id, "stage": stage.name, "fingerprint": stage.fingerprint,
                               "status": "finished", "cached": True, "started_at": now, "finished_at": now,
                               "wall_s": 0.0, "input_fingerprints": _json(stage.input_fingerprints),
                               "output_dir": str(info.workspace.stage_dir(stage.name, stage.fingerprint)),
                               "mlflow_run_id": mlflow_run_id})


def metric_safe(stats: dict[str, float]) -> dict[str, float]:
    """MLflow metric names allow letters, digits, `_-. /`: other characters become `_`."""
    return {METRIC_NAME_UNSAFE.sub("_", name): value for name, value in stats.items()}


def publish_stats_artifact(stage: str, fingerprint: str, stats: dict[str, float]) -> None:
    """The stage's counters (its funnel) as a Prefect table artifact, when running inside Prefect."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None or not stats:
        return
    rows = [{"counter": name, "value": value} for name, value in sorted(stats.items())]
    create_table_artifact(rows, key=f"{stage}-stats", description=f"{stage} {fingerprint}: counters and funnel")


TRAINING_LOG, TRAINING_ROWS = "metrics.jsonl", 200
TRAINING_COLUMNS = ("step", "loss", "val_loss", "val_ppl", "lr", "tokens", "tokens_per_s", "epochs")


def publish_training_artifact(stage: str, fingerprint: str, output: Path) -> None:
    """A stage that trained (its output has `metrics.jsonl`): its curve as a Prefect table artifact."""
    import json

    from prefect.artifacts import create_table_artifact
    from prefect.context import TaskRunContext

    log = output / TRAINING_LOG
    if TaskRunContext.get() is None or not log.is_file():
        return
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    every = max(1, -(-len(rows) // TRAINING_ROWS))          # at most ~200 rows, the last one always kept
    kept = [row for i, row in enumerate(rows) if i % every == 0 or i == len(rows) - 1]
    table = [{key: row[key] for key in TRAINING_COLUMNS if key in row} for row in kept]
    if table:
        create_table_artifact(table, key=f"{stage}-training", description=f"{stage} {fingerprint}: training progress")


def _log_dataset_inputs(stage: PlannedStage, info: RunInfo, mlflow_run_id: str) -> None:
    """`mlflow.log_input` for each upstream output this stage reads."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for key, digest in stage.input_digests.items():
        path = info.workspace.stage_dir(stage.inputs[key], stage.input_fingerprints[key])
        dataset = MetaDataset(LocalArtifactDatasetSource(str(path)), name=f"{stage.inputs[key]}-{stage.input_fingerprints[key]}",
                              digest=digest[:16])
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", key)]))
    if inputs:
        info.tracker.client.log_inputs(mlflow_run_id, datasets=inputs)


def _process_tags() -> dict[str, str]:
    import os
    import socket

    return {"lmforge.pid": str(os.getpid()), "lmforge.host": socket.gethostname()}


def _json(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True)
