"""The pretrain stage: GPT (causal LM) or BERT (MLM, optional NSP) trained from token shards under torchrun."""
from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.pretrain.config import PretrainConfig

if TYPE_CHECKING:
    from storage.stage import StageContext, StageResult

VERSION = "1"

__all__ = ["VERSION", "PretrainConfig", "run"]


def run(config: PretrainConfig, ctx: StageContext) -> StageResult:
    """See `tasks.pretrain.stage.run`; imported on call so `python -m tasks.pretrain.train` loads cleanly."""
    from tasks.pretrain.stage import run as run_stage

    return run_stage(config, ctx)
