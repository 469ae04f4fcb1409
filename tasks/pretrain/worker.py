"""The torchrun entry point: `torchrun ... -m tasks.pretrain.worker --config trainer.json`.

Reads the stage's `TrainerSpec`, picks the objective for the model's architecture, and runs the
shared training loop (`tasks.training`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tasks.pretrain.config import TrainerSpec
from tasks.pretrain.objectives import make_objective
from tasks.training.launch import exit_worker, run_worker
from tasks.training.runtime import die_with_parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="lmforge pretrain worker (run under torchrun)")
    parser.add_argument("--config", required=True, type=Path, help="trainer JSON written by the pretrain stage")
    args = parser.parse_args(argv)
    die_with_parent()
    spec = TrainerSpec.model_validate_json(args.config.read_text())
    return run_worker(spec.loop, lambda: make_objective(spec))


if __name__ == "__main__":
    exit_worker(main())         # a failure raises before this, with its traceback, as usual
