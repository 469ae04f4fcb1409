"""The torchrun entry point: `torchrun ... -m tasks.finetune.worker --config worker.json`.

The stage runs the same `run_worker` in its own process when one process trains (no torchrun).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tasks.finetune.objective import FinetuneObjective, WorkerSpec
from tasks.training.launch import exit_worker, run_worker
from tasks.training.runtime import die_with_parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="lmforge finetune worker (run under torchrun)")
    parser.add_argument("--config", required=True, type=Path, help="worker JSON written by the finetune stage")
    args = parser.parse_args(argv)
    die_with_parent()
    spec = WorkerSpec.model_validate_json(args.config.read_text())
    return run_worker(spec.loop, lambda: FinetuneObjective(spec))


if __name__ == "__main__":
    exit_worker(main())         # a failure raises before this, with its traceback, as usual
