"""What the training loop is told: the optimizer and schedule, and how to run (torch-free, validated by pydantic)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from storage.configbase import StrictModel


class OptimConfig(StrictModel):
    """AdamW with decoupled weight decay; linear warmup, then cosine or linear decay to a floor."""

    lr: float = Field(6e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the floor, as a fraction of lr")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(10, ge=0)
    decay: Literal["cosine", "linear"] = "cosine"
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 turns clipping off")

    @model_validator(mode="after")
    def _betas_in_range(self) -> "OptimConfig":
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"optim.betas={self.betas} must both lie in [0, 1)")
        return self


class LoopConfig(StrictModel):
    """One training run as the loop sees it; a stage builds it from its own config (no secrets inside)."""

    name: str = Field("train", description="the stage: labels logs, the progress bar, config hints")
    run_dir: str                      # checkpoints, metrics.jsonl, model/, done.json
    seed: int
    max_steps: int = Field(ge=1)
    sequences_per_rank: int = Field(ge=1, description="per optimizer step")
    micro_batch: int | None = Field(ge=1, description="None: the largest divisor of the batch that fits")
    optim: OptimConfig = OptimConfig()
    precision: Literal["fp32", "bf16"] = "bf16"
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dist: Literal["ddp", "fsdp"] = "ddp"
    checkpoint_every: int = Field(0, ge=0, description="steps; 0 saves only the final checkpoint")
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="steps; 0 turns validation off")
    eval_batches: int = Field(4, ge=1, description="micro-batches per rank per evaluation")
    on_nonfinite: Literal["stop", "skip"] = "stop"
    peak_flops: float | None = Field(None, gt=0, description="for MFU; None: the GPU table, or a CPU estimate")
    progress: bool = True
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None
