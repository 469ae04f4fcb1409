"""What rank 0 reports: `metrics.jsonl`, the stage's MLflow run, and sampled GPT continuations."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tasks.pretrain.config import SampleConfig

METRICS_FILE, SAMPLES_FILE = "metrics.jsonl", "samples.txt"
MLFLOW_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "val_ppl")


class MetricsLog:
    """Appends one JSON line per logged step and mirrors the numbers into an existing MLflow run."""

    def __init__(self, run_dir: Path, tracking_uri: str | None, run_id: str | None) -> None:
        self.path = run_dir / METRICS_FILE
        self.run_id = run_id
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
                 if key in MLFLOW_KEYS and value is not None and math.isfinite(value)]
        try:
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as exc:   # a tracking hiccup must not cost the training run; metrics.jsonl has it all
            note(f"step {step}: could not log to MLflow ({type(exc).__name__}: {exc})")

    def log_artifacts(self, model_dir: Path, samples: Path | None) -> None:
        """The final weights (as `model/`) and the samples file, into the stage's run."""
        if self.client is None:
            return
        try:
            self.client.log_artifacts(self.run_id, str(model_dir), artifact_path="model")
            if samples is not None and samples.exists():
                self.client.log_artifact(self.run_id, str(samples))
        except Exception as exc:   # the stage output holds the same files
            note(f"could not log artifacts to MLflow ({type(exc).__name__}: {exc})")


def _mlflow_client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def load_tokenizer(tokenizer_dir: str | None) -> Any | None:
    """The tokenizer stage's `tiktoken.Encoding`, or None (with a note) when there is none."""
    if not tokenizer_dir:
        return None
    try:
        from tasks.tokenizer import load_encoding
    except ImportError:
        from tasks.tokenizer.files import load_encoding
    return load_encoding(Path(tokenizer_dir))


def write_samples(model: torch.nn.Module, encoding: Any, sample: SampleConfig, device: torch.device,
                  seed: int, path: Path | None) -> list[str]:
    """Continues each prompt by temperature/top-k sampling; rank 0 passes `path` to write them."""
    generator = torch.Generator(device=device).manual_seed(seed)
    texts = []
    model.eval()
    for prompt in sample.prompts:
        ids = encoding.encode_ordinary(prompt)     # plain text: special-token strings stay text
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        out = model.generate(idx, sample.max_new_tokens, sample.temperature, sample.top_k, generator)
        texts.append(encoding.decode(out[0].tolist(), errors="replace"))
    model.train()
    if path is not None:
        blocks = [f"### sample {i + 1}, prompt {p!r}\n{t}\n" for i, (p, t) in enumerate(zip(sample.prompts, texts))]
        path.write_text("\n".join(blocks))
    return texts


def note(message: str) -> None:
    print(f"pretrain: {message}", file=sys.stderr, flush=True)
