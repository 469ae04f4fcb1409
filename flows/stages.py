"""The stages of the pipeline, in order: what each is called, where its code is, what it reads."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from storage.configbase import StrictModel
from tasks.ingest.config import IngestConfig

# Every stage the design has, in pipeline order; those without a module are not built yet.
PIPELINE_ORDER = ["ingest", "curate", "dedup", "tokenizer", "shard", "pretrain", "finetune", "evaluate"]
DOCUMENT_STAGES = ["ingest", "curate", "dedup"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str                           # exposes VERSION, run(config, ctx), optionally external_inputs(config)
    reads: tuple[str, ...] = ()           # input keys: "documents" = the last document stage before this one
    uses_seed: bool = False               # the pipeline seed changes this stage's output

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


STAGES: dict[str, StageSpec] = {
    "ingest": StageSpec("ingest", "tasks.ingest", uses_seed=True),
}


class StageConfigs(StrictModel):
    """One optional field per built stage; the pipeline config adds name, experiment and seed."""

    ingest: IngestConfig | None = None


def input_stages(spec: StageSpec, enabled: list[str]) -> dict[str, str]:
    """Input key -> the upstream stage that provides it, given the stages enabled in the recipe."""
    before = enabled[: enabled.index(spec.name)]
    mapping: dict[str, str] = {}
    for key in spec.reads:
        if key == "documents":
            candidates = [s for s in before if s in DOCUMENT_STAGES]
        else:
            candidates = [s for s in before if s == key]
        if not candidates:
            raise ValueError(f"stage {spec.name!r} needs {key!r} from an earlier stage; add one to the recipe")
        mapping[key] = candidates[-1]
    return mapping
