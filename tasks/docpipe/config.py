"""Where a datatrove pipeline's ranks run: the executor section of the curate and dedup recipes.

Plain pydantic, so a recipe validates without importing datatrove.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from storage.configbase import StrictModel

# the head's GCS address, as `ray start --head` prints it (Ray Client's ray:// is not supported: the ranks
# write to the stage's scratch, which the driver and the workers must share)
RAY_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}")


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
    """datatrove's RayPipelineExecutor options and the cluster the stage connects to."""

    address: str | None = Field(None, description="the Ray head's GCS host:port (`ray start --head --port`); "
                                "unset: $RAY_ADDRESS, else a private local Ray for the stage only")
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: float = Field(2, gt=0)
    time_s: int | None = Field(None, gt=0, description="per-rank time limit; a rank past it is killed and "
                               "left incomplete (the rerun retries it)")

    @field_validator("address")
    @classmethod
    def _host_and_port(cls, address: str | None) -> str | None:
        if address is not None and not RAY_ADDRESS.fullmatch(address):
            raise ValueError(f"must be the Ray head's host:port, e.g. 127.0.0.1:6379; got {address!r}")
        return address


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
