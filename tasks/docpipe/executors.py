"""Running a datatrove pipeline for a stage: the executor from the recipe, failure isolation, merged stats.

The executor config never changes a stage's fingerprint except through `tasks`: documents are
split into `tasks` shards by rank and every output file is named after its rank, so the task count
decides the file layout (and, for MinHash, which copy of a duplicate cluster survives). `kind`,
`workers` and the Slurm/Ray options only decide where and how many ranks run at once.

Every rank leaves `completions/<rank>` in the logging dir (under the stage's scratch) when it
finishes: a rerun after a crash skips those ranks and runs the others again.

`kind: ray` connects this process to a Ray cluster for each pass (`ray_connection`) and runs the
ranks as datatrove Ray tasks; a failing rank is recorded as the local executor records it, a Ray
worker that dies takes its rank's process with it (`die_with_parent`), so datatrove resubmits it.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from datatrove.executor import LocalPipelineExecutor
from datatrove.executor.base import PipelineExecutor
from datatrove.executor.ray import RankWorker, RayPipelineExecutor
from datatrove.utils.stats import MetricStats, PipelineStats

from storage.stage import StageError
from tasks.docpipe.config import RAY_ADDRESS, ExecutorConfig, RayOptions

# Imported by the forkserver before it forks datatrove's workers (see preload_in_forkserver).
FORKSERVER_PRELOAD = ("spacy", "trafilatura", "pyarrow.parquet", "datatrove.pipeline.filters",
                      "datatrove.pipeline.dedup", "tasks.curate.pipeline", "tasks.dedup.stage")


# The datatrove internals this module relies on (tested in tests/tasks/docpipe/test_executors.py; the
# pin in pyproject.toml keeps datatrove in the tested range): re-check them when datatrove is upgraded.
RUN_FOR_RANK_PARAMETERS = ("self", "rank", "local_rank", "node_rank")
STATS_STEP_KEYS = ("name", "time_stats", "stats")   # one such object per pipeline step in stats/<rank>.json


def datatrove_api_problems() -> list[str]:
    """How the installed datatrove differs from what the Isolating executors override (empty when it matches)."""
    problems = []
    parameters = tuple(inspect.signature(PipelineExecutor._run_for_rank).parameters)
    if parameters != RUN_FOR_RANK_PARAMETERS:
        problems.append(f"PipelineExecutor._run_for_rank now takes {parameters}, not {RUN_FOR_RANK_PARAMETERS}")
    if "self._run_for_rank(" not in inspect.getsource(LocalPipelineExecutor._launch_run_for_rank):
        problems.append("LocalPipelineExecutor._launch_run_for_rank no longer calls self._run_for_rank")
    ray_worker = inspect.getsource(RankWorker.run_for_rank)   # IsolatingRayExecutor and die_with_parent rely on it
    if "executor_ref._run_for_rank(" not in ray_worker or "multiprocess.pool.Pool(" not in ray_worker:
        problems.append("datatrove's Ray RankWorker.run_for_rank no longer runs executor_ref._run_for_rank in a "
                        "forked multiprocess pool")
    return problems


def record_failure(executor: PipelineExecutor, rank: int, err: Exception) -> None:
    """Writes why `rank` failed to `failed/<rank>.json` in the logging dir (read by `_raise_if_incomplete`)."""
    record = {"rank": rank, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
              "log": executor.logging_dir.resolve_paths(f"logs/task_{rank:05d}.log")}
    with executor.logging_dir.open(f"failed/{rank:05d}.json", "w") as handle:
        json.dump(record, handle)


class IsolatingLocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor, except a rank that raises is recorded and the other ranks go on.

    Stock behaviour stops the whole pool at the first failing rank; here the failure is written to
    `failed/<rank>.json` (error, traceback, log file) and the stage reports it once all ranks ran.
    """

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> PipelineStats:
        try:
            return super()._run_for_rank(rank, local_rank, node_rank)
        except Exception as err:  # the rank failed: keep the reason, let the others finish
            record_failure(self, rank, err)
            return PipelineStats()


class IsolatingRayExecutor(RayPipelineExecutor):
    """datatrove's Ray executor, recording why a rank failed in `failed/<rank>.json` like the local one.

    datatrove already lets the other ranks go on when one raises (an application error is not
    retried); the error is re-raised so the Ray task fails and the rank stays incomplete.
    """

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> PipelineStats:
        die_with_parent()
        try:
            return super()._run_for_rank(rank, local_rank, node_rank)
        except Exception as err:
            record_failure(self, rank, err)
            raise


def die_with_parent() -> None:
    """Has the kernel SIGKILL this process when its parent dies (Linux; elsewhere a no-op).

    datatrove's Ray worker runs each rank in a process it forks. Were the worker killed (OOM,
    `kill`), that child would live on holding the worker's socket to Ray, so Ray would never see
    the death and never retry the rank: the stage would hang.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


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
        raise StageError("executor.kind is 'ray' but the ray package is not installed (pip install -e '.[team]')")
    opts = config.ray
    return IsolatingRayExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                                cpus_per_task=opts.cpus_per_task, mem_per_cpu_gb=opts.mem_per_cpu_gb, time=opts.time_s)


def run_executor(executor: PipelineExecutor, config: ExecutorConfig, what: str) -> None:
    """Runs every rank not yet completed; raises StageError naming the failed ranks once all ran."""
    logging_dir = Path(executor.logging_dir.path)
    for rank in executor.get_incomplete_ranks():
        (logging_dir / "failed" / f"{rank:05d}.json").unlink(missing_ok=True)
    if config.kind == "slurm" and shutil.which("sbatch") is None:
        raise StageError("executor.kind is 'slurm' but `sbatch` is not on PATH; run the stage on a Slurm login node")
    if config.kind == "ray":
        _run_on_ray(executor, config.ray, what)
    else:
        executor.run()
    if config.kind == "slurm":
        _wait_for_slurm(executor, config.slurm.poll_interval_s)
    _raise_if_incomplete(executor, logging_dir, what)


# Ray replaces a loopback node address by the machine's own and then listens on every interface;
# with this set (before `import ray`) a cluster on 127.0.0.1 stays on 127.0.0.1, head and driver alike.
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
RAY_CONNECT_TIMEOUT_S = 5.0
RAY_NO_RECORD = ("; it ran past executor.ray.time_s, its Ray worker died, or the worker could not load the "
                 "pipeline: see the worker logs under the head's session dir (/tmp/ray/session_latest/logs)")


def ray_address(opts: RayOptions) -> str | None:
    """The cluster to run on: `executor.ray.address`, else $RAY_ADDRESS; None: a private local Ray."""
    address = opts.address or os.environ.get("RAY_ADDRESS") or None
    if address is not None and not RAY_ADDRESS.fullmatch(address):
        raise StageError(f"$RAY_ADDRESS must be the Ray head's host:port, e.g. 127.0.0.1:6379; got {address!r}")
    return address


@contextmanager
def ray_connection(opts: RayOptions, what: str) -> Iterator[None]:
    """This process connected to the recipe's Ray cluster for one pass; disconnected after it.

    Without an address, a private Ray instance (loopback, no dashboard) lives for the pass only:
    never a cluster that happens to run on the machine. Usage stats are off either way.
    """
    address = ray_address(opts)
    if address is not None:
        _check_reachable(address, what)
    ray = _import_ray(loopback=address is None or _host(address) in LOOPBACK_HOSTS)
    if ray.is_initialized():  # the caller's own session (a notebook): use it, leave it open
        yield
        return
    try:
        with own_sigterm_handler():
            ray.init(address=address or "local", include_dashboard=False)
    except Exception as err:  # ConnectionError, RuntimeError, TimeoutError: no usable cluster there
        raise StageError(f"{what}: could not connect to the Ray cluster at executor.ray.address="
                         f"{address or 'local'}: {type(err).__name__}: {err} (is it a Ray head's GCS port? if the "
                         "head uses token authentication, is $RAY_AUTH_TOKEN or ~/.ray/auth_token its token?)") from err
    try:
        yield
    finally:
        ray.shutdown()  # disconnects; a private instance is stopped with it


@contextmanager
def own_sigterm_handler() -> Iterator[None]:
    """Keeps this process's SIGTERM handler across `ray.init`, which installs its own and keeps it after
    `ray.shutdown`: `lmforge run` must still end KILLED on SIGTERM (flows.cli) after a pass on Ray."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_on_ray(executor: PipelineExecutor, opts: RayOptions, what: str) -> None:
    """Runs the incomplete ranks on the cluster; ranks past `time_s` are left incomplete, not a crash."""
    with ray_connection(opts, what):
        try:
            executor.run()
        except KeyError:
            # datatrove 0.10's Ray executor kills a task past `time`, then looks it up again and raises
            # KeyError (after cancelling the rest): the incomplete ranks are reported by the caller
            if opts.time_s is None:
                raise


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0].strip("[]")


def _check_reachable(address: str, what: str) -> None:
    """Fails in seconds, naming the address, when nothing listens there (ray.init retries for minutes)."""
    port = int(address.rsplit(":", 1)[1])
    try:
        socket.create_connection((_host(address), port), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise StageError(f"{what}: no Ray cluster answers at executor.ray.address={address} ({err}); start one "
                         f"with `ray start --head --port={port}` or fix the address (or $RAY_ADDRESS)") from err


def ray_environment(loopback: bool) -> dict[str, str]:
    """The variables Ray reads when it is imported, as this connection needs them.

    Loopback: see RAY_LOOPBACK_ENV. Token: `ray start` turns token authentication on when it finds a
    token ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) and the driver must then send
    it; a driver sending one still reaches a head without authentication.
    """
    wanted = {RAY_LOOPBACK_ENV: "0"} if loopback else {}
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        wanted["RAY_AUTH_MODE"] = "token"
    return wanted


def _import_ray(loopback: bool) -> Any:
    """`import ray` after setting its environment; a clear error if it was imported earlier without it."""
    wanted = ray_environment(loopback)
    os.environ.update({**wanted, "RAY_USAGE_STATS_ENABLED": "0"})
    import ray

    ignored = _ignored_by_ray(wanted)
    if ignored and not ray.is_initialized():
        settings = " ".join(f"{name}={wanted[name]}" for name in ignored)
        raise StageError(f"ray was imported before lmforge could set {settings}, which Ray reads on import: "
                         "set it in the environment")
    return ray


def _ignored_by_ray(wanted: dict[str, str]) -> list[str]:
    """The wanted settings the imported ray does not apply (it read its environment on import)."""
    from ray._private import ray_constants
    from ray._raylet import AuthenticationMode, get_authentication_mode

    ignored = []
    if RAY_LOOPBACK_ENV in wanted and ray_constants.ENABLE_RAY_CLUSTER:
        ignored.append(RAY_LOOPBACK_ENV)
    if "RAY_AUTH_MODE" in wanted and get_authentication_mode() != AuthenticationMode.TOKEN:
        ignored.append("RAY_AUTH_MODE")
    return ignored


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
            failures.append(f"rank {rank}: did not complete (log: {logging_dir / 'logs' / f'task_{rank:05d}.log'})"
                            + RAY_NO_RECORD * isinstance(executor, RayPipelineExecutor))
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
