"""What rank 0 reports: `metrics.jsonl`, and the same numbers in the stage's MLflow run."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
MLFLOW_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "epochs")      # plus every val_* metric


class MetricsLog:
    """Appends one JSON line per logged step and mirrors the numbers into an existing MLflow run."""

    def __init__(self, run_dir: Path, tracking_uri: str | None, run_id: str | None, tag: str = "train") -> None:
        self.path, self.run_id, self.tag = run_dir / METRICS_FILE, run_id, tag
        self.client = _mlflow_client(tracking_uri) if tracking_uri and run_id else None

    def truncate_after(self, step: int) -> None:
        """Drops lines past `step`: a resumed run logs those steps again."""
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.client is not None:
            self._to_mlflow(step, metrics)

    def _to_mlflow(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()
                 if (key in MLFLOW_KEYS or key.startswith("val_")) and value is not None and math.isfinite(value)]
        try:
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as exc:   # a tracking hiccup must not cost the training run; metrics.jsonl has it all
            note(f"step {step}: could not log to MLflow ({type(exc).__name__}: {exc})", self.tag)

    def log_artifacts(self, model_dir: Path, extras: list[Path]) -> None:
        """The final weights (as `model/`) and the objective's extra files, into the stage's run."""
        if self.client is None:
            return
        try:
            self.client.log_artifacts(self.run_id, str(model_dir), artifact_path="model")
            for path in extras:
                if path.exists():
                    self.client.log_artifact(self.run_id, str(path))
        except Exception as exc:   # the stage output holds the same files
            note(f"could not log artifacts to MLflow ({type(exc).__name__}: {exc})", self.tag)


def _mlflow_client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def note(message: str, tag: str = "train") -> None:
    print(f"{tag}: {message}", file=sys.stderr, flush=True)
