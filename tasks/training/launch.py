"""Running the loop under torchrun: the command a node runs, waiting for it, and the worker's side.

A stage writes a JSON spec into its run directory and runs `worker_command(...)` (torchrun wrapped so
it dies with the stage). Each worker calls `run_worker(loop_config, make_objective)`; a worker that
fails writes its traceback to `run_dir/errors/` first, so the stage reports the root cause, not
torchrun's summary.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, NoReturn

from storage.stage import StageError
from tasks.training.config import LoopConfig
from tasks.training.loop import Trainer
from tasks.training.objective import Objective
from tasks.training.runtime import init_distributed, shutdown

ERRORS_DIR, LOG_FILE, LOCK_FILE = "errors", "torchrun.log", ".lock"


def torchrun_args(nnodes: int, nproc_per_node: int, rdzv_endpoint: str | None, node_rank: int = 0,
                  run_id: str = "lmforge") -> list[str]:
    """torchrun's own flags: a standalone rendezvous on one node, c10d at `rdzv_endpoint` otherwise."""
    args = [f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}", "--max-restarts=0", "--monitor-interval=0.5"]
    if rdzv_endpoint is None:
        return [*args, "--standalone"]
    return [*args, "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={run_id}",
            f"--node-rank={node_rank}"]


def worker_command(module: str, spec_path: Path, torchrun: list[str]) -> list[str]:
    """`torchrun TORCHRUN -m MODULE --config SPEC`, with torchrun dying when its parent does."""
    return [sys.executable, "-m", "tasks.training.runtime", *torchrun, "-m", module, "--config", str(spec_path)]


def launch(command: list[str], run_dir: Path) -> None:
    """Runs this node's torchrun agent to completion; a failure raises StageError with the root traceback."""
    shutil.rmtree(run_dir / ERRORS_DIR, ignore_errors=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    pump = threading.Thread(target=_pump, args=(process.stdout, run_dir / LOG_FILE), daemon=True)
    pump.start()
    try:
        code = process.wait()
    except BaseException:
        _stop(process)
        raise
    finally:
        pump.join(timeout=10)
    if code != 0:
        raise StageError(failure_message(run_dir, code))


def _pump(stream: IO[bytes], log_path: Path) -> None:
    """Copies torchrun's output to our stderr (progress bar included) and to the run's log file."""
    with log_path.open("ab") as log:
        while chunk := os.read(stream.fileno(), 65536):
            log.write(chunk)
            log.flush()
            sys.stderr.write(chunk.decode("utf-8", errors="replace"))
            sys.stderr.flush()


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (torchrun then stops its workers), SIGKILL if that takes more than 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def failure_message(run_dir: Path, code: int) -> str:
    """The first worker's recorded error with its traceback, else the tail of torchrun's output."""
    entries = [json.loads(p.read_text()) for p in sorted((run_dir / ERRORS_DIR).glob("rank-*.json"))]
    if entries:
        first = min(entries, key=lambda e: e["time"])
        return (f"{first['stage']} worker rank {first['rank']} failed: {first['type']}: {first['message']} "
                f"(torchrun exit code {code})\n{first['traceback']}")
    log = run_dir / LOG_FILE
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log.exists() else ""
    return f"torchrun exited with code {code} and no worker recorded an error; its last output:\n{tail}"


@contextlib.contextmanager
def exclusive(scratch: Path, name: str) -> Iterator[None]:
    """One live run per fingerprint: a second one fails at once instead of sharing checkpoints."""
    scratch.mkdir(parents=True, exist_ok=True)
    with (scratch / LOCK_FILE).open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageError(f"{scratch}: another {name} run with this fingerprint is running") from None
        yield


# ---- the worker's side ------------------------------------------------------------------------


def record_failure(run_dir: Path, name: str, rank: int, exc: BaseException) -> None:
    """Writes this rank's traceback where the stage looks for it after torchrun exits."""
    errors = run_dir / ERRORS_DIR
    errors.mkdir(parents=True, exist_ok=True)
    entry = {"stage": name, "rank": rank, "time": time.time(), "type": type(exc).__name__, "message": str(exc),
             "traceback": "".join(traceback.format_exception(exc))}
    (errors / f"rank-{rank}.json").write_text(json.dumps(entry, indent=2))


def exit_worker(code: int) -> NoReturn:
    """Ends a torchrun worker process once its work is done and recorded, skipping the interpreter's teardown.

    Tearing down the process group's native threads while the interpreter finalizes can abort a worker
    (SIGABRT, "terminate called without an active exception"), and torchrun then fails a finished run: seen
    once, on the FSDP test, after `done.json` was written. Only the entry points call this; a run in the
    stage's own process (`launcher: inprocess`) returns normally."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_worker(config: LoopConfig, make_objective: Callable[[], Objective]) -> int:
    """One torchrun worker: join the process group, train, leave; a failure is recorded, then re-raised."""
    try:
        env = init_distributed(config.device)
        Trainer(config, make_objective(), env).fit()
    except BaseException as exc:
        record_failure(Path(config.run_dir), config.name, int(os.environ.get("RANK", 0)), exc)
        raise
    shutdown()
    return 0
