"""What people read: the GLUE table (the BERT paper's layout), sample-efficiency curves, per-task MLflow runs.

The GLUE table has the BERT paper's Table 1 columns (MNLI-m/mm, QQP, QNLI, SST-2, CoLA, STS-B, MRPC,
RTE; WNLI after them, as the paper leaves it out of its average) and the mean of the official metrics
present, x100. QQP and MRPC show F1/accuracy, STS-B Pearson/Spearman as in the GLUE leaderboard; the
average takes what BERT's Table 1 reports: F1 for QQP and MRPC, Spearman for STS-B (`AVERAGED`).
"""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GLUE_COLUMNS = (("MNLI-m/mm", ("mnli-m", "mnli-mm"), ("accuracy",)), ("QQP", ("qqp",), ("f1", "accuracy")),
                ("QNLI", ("qnli",), ("accuracy",)), ("SST-2", ("sst2",), ("accuracy",)),
                ("CoLA", ("cola",), ("matthews_corrcoef",)), ("STS-B", ("stsb",), ("pearson", "spearmanr")),
                ("MRPC", ("mrpc",), ("f1", "accuracy")), ("RTE", ("rte",), ("accuracy",)),
                ("WNLI", ("wnli",), ("accuracy",)))
AVERAGED = {"STS-B": "spearmanr"}      # BERT's Table 1: "Spearman correlations are reported for STS-B"


def glue_cell(results: dict[str, dict[str, float]], sets: tuple[str, ...], names: tuple[str, ...],
              averaged: str | None = None) -> tuple[str, float | None]:
    """(the cell's text, the number it adds to the average: `averaged`, else the first name) for one column;
    '-' when not run."""
    if len(sets) > 1:               # MNLI: one metric on two evaluation sets
        values = [results[s][names[0]] for s in sets if s in results]
        shown = [f"{results[s][names[0]] * 100:.1f}" if s in results else "-" for s in sets]
    else:
        values = [results[sets[0]][n] for n in names] if sets[0] in results else []
        shown = [f"{v * 100:.1f}" for v in values] or ["-"]
    if averaged is not None and values:
        return "/".join(shown), results[sets[0]][averaged]
    return "/".join(shown), (values[0] if values else None)


def glue_table(results: dict[str, dict[str, float]], counts: dict[str, str], title: str) -> str:
    """Markdown: one row of scores, one of training/eval sizes, and what the average covers."""
    header = [name for name, _, _ in GLUE_COLUMNS]
    cells, averaged = [], []
    for name, sets, names in GLUE_COLUMNS:
        text, value = glue_cell(results, sets, names, AVERAGED.get(name))
        cells.append(text)
        if value is not None and name != "WNLI":
            averaged.append(value)
    average = f"{sum(averaged) / len(averaged) * 100:.1f}" if averaged else "-"
    sizes = [counts.get(sets[0], "-") for _, sets, _ in GLUE_COLUMNS]
    lines = [f"| System | {' | '.join(header)} | Average |", "|---" * (len(header) + 2) + "|",
             f"| {title} | {' | '.join(cells)} | {average} |", f"| train / eval examples | {' | '.join(sizes)} | |"]
    note = ("Scores x100 on each task's evaluation set (the dev set, or a seeded carve-out where a task ships one "
            "file). QQP and MRPC: F1/accuracy; STS-B: Pearson/Spearman; CoLA: Matthews correlation; others "
            f"accuracy. The average is over the {len(averaged)} columns present (F1 for QQP and MRPC, Spearman for "
            "STS-B), WNLI excluded, as in the BERT paper.")
    return "\n".join(lines) + "\n\n" + note + "\n"


# ---- sample-efficiency curves -----------------------------------------------------------------


def curve_table(task: str, metric: str, points: dict[str, dict[float, float]], sizes: dict[float, int]) -> str:
    inits = sorted(points)
    lines = [f"| {task}: training data | examples | " + " | ".join(f"{init} {metric}" for init in inits) + " |",
             "|---" * (len(inits) + 2) + "|"]
    for fraction in sorted(sizes):
        values = [f"{points[init][fraction]:.4f}" if fraction in points[init] else "-" for init in inits]
        lines.append(f"| {fraction:.0%} | {sizes[fraction]} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def curve_png(path: Path, task: str, metric: str, points: dict[str, dict[float, float]],
              sizes: dict[float, int]) -> Path:
    """Score against training examples, one line per init (FinBERT's accuracy-vs-training-size figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for init in sorted(points):
        fractions = sorted(points[init])
        axes.plot([sizes[f] for f in fractions], [points[init][f] for f in fractions], marker="o", label=init)
    axes.set_xlabel("training examples")
    axes.set_ylabel(metric)
    axes.set_title(f"{task}: sample efficiency")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})     # no matplotlib version in the bytes
    plt.close(figure)
    return path


# ---- MLflow: one nested run per task ----------------------------------------------------------


class TaskRuns:
    """Nested MLflow runs under the stage's run; each tagged like the stage runs, so a killed one ends KILLED."""

    def __init__(self, tracking_uri: str | None, stage_run_id: str | None) -> None:
        self.client = None
        if tracking_uri and stage_run_id:
            from mlflow.tracking import MlflowClient

            self.client, self.parent = MlflowClient(tracking_uri), stage_run_id
            self.experiment = self.client.get_run(stage_run_id).info.experiment_id

    @contextlib.contextmanager
    def run(self, task: str, params: dict[str, Any]) -> Iterator[str | None]:
        if self.client is None:
            yield None
            return
        run_id = self._start(task, params)
        try:
            yield run_id
        except BaseException as err:
            self.client.set_terminated(run_id, "FAILED" if isinstance(err, Exception) else "KILLED")
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def _start(self, task: str, params: dict[str, Any]) -> str:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        from storage.tracking import flatten

        tags = {MLFLOW_PARENT_RUN_ID: self.parent, "lmforge.stage": "finetune", "lmforge.task": task,
                "lmforge.pid": str(os.getpid()), "lmforge.host": socket.gethostname()}
        run = self.client.create_run(self.experiment, run_name=f"finetune/{task}", tags=tags)
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[start:start + 100])
        return run.info.run_id

    def log(self, run_id: str | None, metrics: dict[str, float], files: list[Path]) -> None:
        if self.client is None or run_id is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        for path in files:
            if path.is_file():
                self.client.log_artifact(run_id, str(path))

    def log_stage_text(self, text: str, name: str) -> None:
        if self.client is not None:
            self.client.log_text(self.parent, text, name)


def publish_markdown(markdown: str, key: str, description: str) -> None:
    """A Prefect markdown artifact, when running inside a Prefect task."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is not None:
        create_markdown_artifact(markdown, key=key, description=description)
