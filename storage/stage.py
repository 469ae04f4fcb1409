"""What every stage receives and returns: the context of one execution and its result."""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.configbase import StrictModel

STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class StageContext:
    """Everything a stage's pure `run(config, ctx)` needs besides its config.

    `output` is the temporary directory the stage writes into; the storage layer renames it into
    place and writes `_SUCCESS.json` after `run` returns. `scratch` survives a crash (same path for
    the same fingerprint), so resumable stages keep checkpoints or completion markers there.
    """

    stage: str
    fingerprint: str
    output: Path
    scratch: Path
    inputs: dict[str, Path]          # upstream stage name -> its committed output directory
    workspace: Path
    seed: int = 0
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None  # the stage's own (nested) MLflow run


@dataclass
class StageResult:
    """What a stage reports: counters for `stage_stats`, and the bad inputs it skipped."""

    stats: dict[str, float] = field(default_factory=dict)
    bad_inputs: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)   # small JSON-able extras for _SUCCESS.json

    def count(self, name: str, by: float = 1) -> None:
        """Add `by` to counter `name`."""
        self.stats[name] = self.stats.get(name, 0) + by

    def bad(self, path: str, reason: str, detail: str = "", where: str | None = None) -> None:
        """Record one bad file or record; it is listed in `_SUCCESS.json` and counted."""
        entry = {"path": path, "reason": reason, "detail": detail[:500]}
        if where is not None:
            entry["where"] = where
        self.bad_inputs.append(entry)


class StageError(RuntimeError):
    """A stage failed for a reason the user can act on (message names the file/field)."""


RunFn = Callable[[Any, StageContext], StageResult]


def never(config: Any) -> bool:
    """The pipeline seed never changes this stage's output."""
    return False


def always(config: Any) -> bool:
    """The pipeline seed always changes this stage's output (training, random initialisation)."""
    return True


def deferred(target: str) -> RunFn:
    """`run` given as `"package.module:function"`, imported on the first call.

    Declaring a stage (and so validating a recipe) then never imports torch or datatrove.
    """
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"deferred({target!r}): expected 'package.module:function'")

    def run(config: Any, ctx: StageContext) -> StageResult:
        return getattr(importlib.import_module(module_name), function_name)(config, ctx)

    run.__qualname__ = run.__name__ = target
    run.target = target  # type: ignore[attr-defined]
    return run


@dataclass(frozen=True)
class Stage:
    """What a stage module declares about itself, as `STAGE = Stage(...)` in its package.

    `reads` names input keys: another stage's name, or a key some stages `provide` (ingest, curate
    and dedup provide `documents`); each key is served by the last stage before this one in the
    recipe that provides it. `reads` may also be a function of the config (a pretrained tokenizer
    reads no documents). `optional_reads` are used when such a stage is in the recipe.
    `seed_matters(config)` says whether the pipeline seed changes the output (only then does it
    enter the fingerprint). `external_inputs(config)` returns what else decides the output (files,
    library versions). `catalog_views` maps a catalog view name to a glob under the stage output.
    `headline` names the counters (exact names or `fnmatch` patterns) that summarise a run: the
    terminal's line for the stage, an ablation's parent MLflow run and `lmforge compare` show them.
    `digest_ignores` names output files (`fnmatch` patterns of their relative paths) that report on
    the build, such as timings, and that no later stage reads: `_SUCCESS.json` lists them with their
    sha256, but they stay out of `output_digest`, so a rebuild that changed only them (`--force` of a
    deterministic stage) leaves the later stages fresh.
    """

    name: str
    version: str
    config: type[StrictModel]
    run: RunFn
    reads: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    optional_reads: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    seed_matters: Callable[[Any], bool] = never
    external_inputs: Callable[[Any], dict[str, Any]] | None = None
    catalog_views: Mapping[str, str] = field(default_factory=dict)
    headline: tuple[str, ...] = ()
    digest_ignores: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = stage_problems(self)
        if problems:
            raise TypeError(f"stage {self.name!r} is not a valid Stage: {'; '.join(problems)}")

    def reads_for(self, config: Any) -> tuple[str, ...]:
        """The input keys this configuration needs."""
        return tuple(self.reads(config)) if callable(self.reads) else self.reads

    def headline_stats(self, stats: Mapping[str, float]) -> dict[str, float]:
        """The counters of `stats` named by `headline`, in its order."""
        from fnmatch import fnmatchcase

        return {name: stats[name] for pattern in self.headline for name in stats if fnmatchcase(name, pattern)}

    @property
    def keys(self) -> tuple[str, ...]:
        """The input keys this stage can serve: its own name and what it provides."""
        return (self.name, *self.provides)


def stage_problems(stage: Stage) -> list[str]:
    """Every way `stage` breaks the protocol (empty when it keeps it)."""
    problems = []
    if not isinstance(stage.name, str) or not STAGE_NAME.match(stage.name):
        problems.append(f"name {stage.name!r} must match {STAGE_NAME.pattern}")
    if not isinstance(stage.version, str) or not stage.version:
        problems.append("version must be a non-empty string (bump it when the output changes)")
    if not (isinstance(stage.config, type) and issubclass(stage.config, StrictModel)):
        problems.append("config must be a StrictModel subclass")
    for name in ("run", "seed_matters"):
        if not callable(getattr(stage, name)):
            problems.append(f"{name} must be callable")
    if stage.external_inputs is not None and not callable(stage.external_inputs):
        problems.append("external_inputs must be callable or None")
    for name in ("reads", "optional_reads", "provides", "headline", "digest_ignores"):
        value = getattr(stage, name)
        if name == "reads" and callable(value):
            continue
        if not isinstance(value, tuple) or not all(isinstance(k, str) and k for k in value):
            problems.append(f"{name} must be a tuple of non-empty strings")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in dict(stage.catalog_views).items()):
        problems.append("catalog_views must map view names to globs")
    return problems
