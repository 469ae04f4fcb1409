"""Running a datatrove pipeline for a stage: the executor from the recipe, failure isolation, merged stats.

The executor config never changes a stage's fingerprint except through `tasks`: documents are
split into `tasks` shards by rank and every output file is named after its rank, so the task count
decides the file layout (and, for MinHash, which copy of a duplicate cluster survives). `kind`,
`workers` and the Slurm/Ray options only decide where and how many ranks run at once.

Every rank leaves `completions/<rank>` in the logging dir (under the stage's scratch) when it
finishes: a rerun after a crash skips those ranks and runs the others again.
"""
from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

from datatrove.executor import LocalPipelineExecutor
from datatrove.executor.base import PipelineExecutor
from datatrove.utils.stats import MetricStats, PipelineStats
from storage.stage import StageError
from tasks.docpipe.config import ExecutorConfig, RayOptions

# Imported by the forkserver before it forks datatrove's workers (see preload_in_forkserver).
FORKSERVER_PRELOAD = ("spacy", "trafilatura", "pyarrow.parquet", "datatrove.pipeline.filters",
                      "datatrove.pipeline.dedup", "tasks.curate.pipeline", "tasks.dedup.stage")


# The datatrove internals this module relies on (tested in tests/tasks/docpipe/test_executors.py; the
# pin in pyproject.toml keeps datatrove in the tested range): re-check them when datatrove is upgraded.
RUN_FOR_RANK_PARAMETERS = ("self", "rank", "local_rank", "node_rank")
STATS_STEP_KEYS = ("name", "time_stats", "stats")   # one such object per pipeline step in stats/<rank>.json


def datatrove_api_problems() -> list[str]:
    """How the installed datatrove differs from what IsolatingLocalExecutor overrides (empty when it matches)."""
    problems = []
    parameters = tuple(inspect.signature(PipelineExecutor._run_for_rank).parameters)
    if parameters != RUN_FOR_RANK_PARAMETERS:
        problems.append(f"PipelineExecutor._run_for_rank now takes {parameters}, not {RUN_FOR_RANK_PARAMETERS}")
    if "self._run_for_rank(" not in inspect.getsource(LocalPipelineExecutor._launch_run_for_rank):
        problems.append("LocalPipelineExecutor._launch_run_for_rank no longer calls self._run_for_rank")
    return problems


class IsolatingLocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor, except a rank that raises is recorded and the other ranks go on.

    Stock behaviour stops the whole pool at the first failing rank; here the failure is written to
    `failed/<rank>.json` (error, traceback, log file) and the stage reports it once all ranks ran.
    """

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> PipelineStats:
        try:
            return super()._run_for_rank(rank, local_rank, node_rank)
        except Exception as err:  # the rank failed: keep the reason, let the others finish
            record = {"rank": rank, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
                      "log": self.logging_dir.resolve_paths(f"logs/task_{rank:05d}.log")}
            with self.logging_dir.open(f"failed/{rank:05d}.json", "w") as handle:
                json.dump(record, handle)
            return PipelineStats()


def preload_in_forkserver() -> None:
    """Has the forkserver import spaCy, Trafilatura and datatrove's steps once, before it forks workers.

    Every worker of every pool otherwise imports them itself (seconds each, per pass). This only
    applies if the forkserver of this process has not started yet; later pools reuse it either way.
    """
    import multiprocess.forkserver

    multiprocess.forkserver.set_forkserver_preload(["__main__", *FORKSERVER_PRELOAD])


def build_executor(pipeline: list, config: ExecutorConfig, logging_dir: Path, tasks: int | None = None,
                   workers: int | None = None, job_name: str = "lmforge") -> PipelineExecutor:
    """The datatrove executor the recipe asks for, logging (stats, completions) under `logging_dir`."""
    tasks = config.tasks if tasks is None else tasks
    workers = min(config.workers if workers is None else workers, tasks)
    if config.kind == "local":
        if workers > 1:
            preload_in_forkserver()
        return IsolatingLocalExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir))
    if config.kind == "slurm":
        return _slurm_executor(pipeline, config, logging_dir, tasks, workers, job_name)
    return _ray_executor(pipeline, config, logging_dir, tasks, workers)


def _slurm_executor(pipeline: list, config: ExecutorConfig, logging_dir: Path, tasks: int, workers: int,
                    job_name: str) -> PipelineExecutor:
    from datatrove.executor import SlurmPipelineExecutor

    opts = config.slurm
    return SlurmPipelineExecutor(
        pipeline, tasks=tasks, workers=workers, time=opts.time, partition=opts.partition,
        cpus_per_task=opts.cpus_per_task, mem_per_cpu_gb=opts.mem_per_cpu_gb, qos=opts.qos,
        job_name=f"{opts.job_name}-{job_name}", venv_path=opts.venv_path, sbatch_args=dict(opts.sbatch_args),
        logging_dir=str(logging_dir), slurm_logs_folder=str(logging_dir / "slurm_logs"))


def _ray_executor(pipeline: list, config: ExecutorConfig, logging_dir: Path, tasks: int,
                  workers: int) -> PipelineExecutor:
    from importlib.util import find_spec

    if find_spec("ray") is None:
        raise StageError("executor.kind is 'ray' but the ray package is not installed (pip install 'ray[default]')")
    from datatrove.executor.ray import RayPipelineExecutor

    opts = config.ray
    return RayPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                               cpus_per_task=opts.cpus_per_task, mem_per_cpu_gb=opts.mem_per_cpu_gb, time=opts.time_s)


def run_executor(executor: PipelineExecutor, config: ExecutorConfig, what: str) -> None:
    """Runs every rank not yet completed; raises StageError naming the failed ranks once all ran."""
    logging_dir = Path(executor.logging_dir.path)
    for rank in executor.get_incomplete_ranks():
        (logging_dir / "failed" / f"{rank:05d}.json").unlink(missing_ok=True)
    if config.kind == "ray":
        _ray_init(config.ray)
    if config.kind == "slurm" and shutil.which("sbatch") is None:
        raise StageError("executor.kind is 'slurm' but `sbatch` is not on PATH; run the stage on a Slurm login node")
    executor.run()
    if config.kind == "slurm":
        _wait_for_slurm(executor, config.slurm.poll_interval_s)
    _raise_if_incomplete(executor, logging_dir, what)


def _ray_init(opts: RayOptions) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=opts.address)


def _wait_for_slurm(executor: Any, poll_interval_s: float) -> None:
    """Slurm's executor submits and returns: wait until every rank completed or the job left the queue."""
    while executor.get_incomplete_ranks():
        queued = subprocess.run(["squeue", "-h", "-j", str(executor.job_id)], capture_output=True, text=True)
        if queued.returncode == 0 and not queued.stdout.strip():
            return  # no job left in the queue: whatever is incomplete now has failed
        time.sleep(poll_interval_s)


def _raise_if_incomplete(executor: PipelineExecutor, logging_dir: Path, what: str) -> None:
    incomplete = executor.get_incomplete_ranks()
    if not incomplete:
        return
    failures = []
    for rank in incomplete:
        record_path = logging_dir / "failed" / f"{rank:05d}.json"
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            failures.append(f"rank {rank}: {record['error']} (log: {record['log']})")
        else:
            failures.append(f"rank {rank}: did not complete (log: {logging_dir / 'logs' / f'task_{rank:05d}.log'})")
    raise StageError(f"{what}: {len(incomplete)} of {executor.world_size} tasks failed; a rerun retries only "
                     f"these, the completed ones are kept.\n" + "\n".join(failures[:20]))


def merged_step_stats(logging_dir: Path, tasks: int) -> list[dict[str, float]]:
    """Per pipeline step, the totals of its counters summed over every rank's `stats/<rank>.json`."""
    merged: list[dict[str, float]] = []
    for rank in range(tasks):
        path = logging_dir / "stats" / f"{rank:05d}.json"
        if not path.is_file():
            raise StageError(f"stats of rank {rank} are missing: {path}")
        for index, step in enumerate(_step_entries(path)):
            if index == len(merged):
                merged.append({})
            for name, value in step["stats"].items():
                merged[index][name] = merged[index].get(name, 0) + MetricStats.from_dict(value).total
            merged[index]["time_s"] = merged[index].get("time_s", 0) + MetricStats.from_dict(
                step["time_stats"]).total
    return merged


def _step_entries(path: Path) -> list[dict[str, Any]]:
    """The per-step objects of one rank's stats file, in pipeline order (datatrove's `PipelineStats.to_json`)."""
    steps = json.loads(path.read_text())
    if not isinstance(steps, list) or not all(isinstance(s, dict) and all(k in s for k in STATS_STEP_KEYS)
                                              for s in steps):
        raise StageError(f"{path}: datatrove changed the layout of its stats files (expected a list of "
                         f"{{{', '.join(STATS_STEP_KEYS)}}} per step); re-check merged_step_stats")
    return steps
