"""What every stage receives and returns: the context of one execution and its result."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
