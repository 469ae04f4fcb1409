"""Where a datatrove pipeline's ranks run: the executor section of the curate and dedup recipes.

Plain pydantic, so a recipe validates without importing datatrove.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from storage.configbase import StrictModel


class SlurmOptions(StrictModel):
    """datatrove's SlurmPipelineExecutor options; the scratch dir must be on a filesystem the nodes share."""

    partition: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: int = Field(2, ge=1, description="whole GB: sbatch rejects --mem-per-cpu=2.5G")
    qos: str = "normal"
    job_name: str = "lmforge"
    venv_path: str | None = None          # `source`d in the job script; default: the job inherits nothing
    sbatch_args: dict[str, str] = {}
    poll_interval_s: float = Field(30, gt=0)   # how often the stage checks the job's completion markers


class RayOptions(StrictModel):
    """datatrove's RayPipelineExecutor options; `address` is passed to `ray.init` (None: local/auto)."""

    address: str | None = None
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: float = Field(2, gt=0)
    time_s: int | None = Field(None, gt=0)     # per-task time limit


class ExecutorConfig(StrictModel):
    """Where the ranks run. Only `tasks` changes the output (it decides the file layout)."""

    non_output_fields = frozenset({"kind", "workers", "slurm", "ray"})

    kind: Literal["local", "slurm", "ray"] = "local"
    tasks: int = Field(4, ge=1, description="number of shards (ranks); output files are named by rank")
    workers: int = Field(1, ge=1, description="ranks running at once (processes, array jobs or Ray tasks)")
    slurm: SlurmOptions = SlurmOptions()
    ray: RayOptions = RayOptions()

    @model_validator(mode="after")
    def _slurm_needs_partition(self) -> "ExecutorConfig":
        if self.kind == "slurm" and not self.slurm.partition:
            raise ValueError("executor.slurm.partition is required when executor.kind is 'slurm'")
        return self
