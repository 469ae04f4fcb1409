"""MLflow helpers: one parent run per pipeline run, one nested run per stage, never left RUNNING."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from storage.telemetry import TELEMETRY_OFF, disable_telemetry  # noqa: F401  (re-exported)

MAX_PARAM_LENGTH = 6000
SECRET_NAMES = {"password", "passwd", "secret", "token", "api_key", "apikey", "access_key", "secret_key",
                "credentials", "credential", "auth"}
SECRET_SUFFIXES = ("_password", "_secret", "_token", "_api_key", "_access_key", "_secret_key")


def tracking_uri(workspace: Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a sqlite store inside the workspace."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workspace) / 'mlflow.db'}"


def artifact_location(workspace: Path) -> str:
    return (Path(workspace) / "mlartifacts").as_uri()


def is_secret_key(name: str) -> bool:
    """True for a dotted key whose last segment names a credential (`hf_token`, `db.password`, ...)."""
    last = name.rsplit(".", 1)[-1].lower()
    return last in SECRET_NAMES or last.endswith(SECRET_SUFFIXES)


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': [1]}} -> {'a.b.0': '1'}; values under credential-like keys are masked."""
    if isinstance(config, Mapping):
        items = [(f"{prefix}{key}", value) for key, value in config.items()]
    else:
        items = [(f"{prefix}{index}", value) for index, value in enumerate(config)]
    flat: dict[str, str] = {}
    for name, value in items:
        if is_secret_key(name):
            flat[name] = "***"
        elif isinstance(value, (Mapping, list, tuple)) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def redact_uri(uri: str) -> str:
    """`postgresql://user:pw@host/db` -> `postgresql://user:***@host/db`, for printing."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if not parts.password:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Tracker:
    """A thin layer over `MlflowClient` (explicit run ids: safe from threads and subprocesses)."""

    def __init__(self, workspace: Path, experiment: str) -> None:
        self.uri = tracking_uri(workspace)
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=artifact_location(workspace) if self.uri.startswith("sqlite") else None)

    def start_run(self, name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None,
                  parent_run_id: str | None = None) -> str:
        all_tags = {MLFLOW_RUN_NAME: name, **(tags or {})}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, v) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        import time

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def mark_dead_runs(self, is_dead: Callable[[dict[str, str]], bool]) -> list[str]:
        """Runs still RUNNING whose process is gone (`is_dead(tags)`) become KILLED; returns their ids."""
        running = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                          max_results=1000)
        dead = [r.info.run_id for r in running if is_dead(r.data.tags)]
        for run_id in dead:
            self.end_run(run_id, RunStatus.to_string(RunStatus.KILLED))
        return dead
