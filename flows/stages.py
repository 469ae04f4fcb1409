"""The stages of the pipeline, in order: what each is called, where its code is, what it reads."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from storage.configbase import StrictModel
from tasks.curate.config import CurateConfig
from tasks.dedup.config import DedupConfig
from tasks.ingest.config import IngestConfig
from tasks.pretrain.config import PretrainConfig
from tasks.shard import ShardConfig
from tasks.tokenizer.config import TokenizerConfig

# Every stage the design has, in pipeline order; those without a module are not built yet.
PIPELINE_ORDER = ["ingest", "curate", "dedup", "tokenizer", "shard", "pretrain", "finetune", "evaluate"]
DOCUMENT_STAGES = ["ingest", "curate", "dedup"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str                           # exposes VERSION, run(config, ctx), optionally external_inputs(config)
    reads: tuple[str, ...] = ()           # input keys: "documents" = the last document stage before this one
    seed_matters: Callable[[Any], bool] = lambda config: False   # does the pipeline seed change the output?

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


STAGES: dict[str, StageSpec] = {
    # The seed enters a fingerprint only where it changes the output, so seed ablations share their data.
    "ingest": StageSpec("ingest", "tasks.ingest", seed_matters=lambda c: any(s.sample_rate < 1 for s in c.sources)),
    "curate": StageSpec("curate", "tasks.curate", reads=("documents",), seed_matters=lambda c: c.sample_rate < 1),
    "dedup": StageSpec("dedup", "tasks.dedup", reads=("documents",)),
    "tokenizer": StageSpec("tokenizer", "tasks.tokenizer", reads=("documents",)),
    "shard": StageSpec("shard", "tasks.shard", reads=("documents", "tokenizer")),
    "pretrain": StageSpec("pretrain", "tasks.pretrain", reads=("shard", "tokenizer"), seed_matters=lambda c: True),
}


class StageConfigs(StrictModel):
    """One optional field per built stage; the pipeline config adds name, experiment and seed."""

    ingest: IngestConfig | None = None
    curate: CurateConfig | None = None
    dedup: DedupConfig | None = None
    tokenizer: TokenizerConfig | None = None
    shard: ShardConfig | None = None
    pretrain: PretrainConfig | None = None


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
