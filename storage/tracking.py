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


UI_FILE = "ui.json"     # written by `lmforge ui` while it runs (flows/ui.py)


def tracking_uri(workspace: Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else the MLflow server of a PostgreSQL-backed `lmforge ui` of this
    workspace (its ui.json says), else a sqlite store inside the workspace."""
    return os.environ.get("MLFLOW_TRACKING_URI") or shared_tracking_server(workspace) or workspace_store_uri(workspace)


def workspace_store_uri(workspace: Path) -> str:
    """The workspace's own sqlite store (one machine, no server needed)."""
    return f"sqlite:///{Path(workspace) / 'mlflow.db'}"


def read_ui_record(workspace: Path) -> dict[str, Any]:
    """What a running `lmforge ui` of this workspace wrote to ui.json; {} when there is none (or it is unreadable)."""
    import json

    try:
        record = json.loads((Path(workspace) / UI_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def shared_tracking_server(workspace: Path) -> str | None:
    """The MLflow server runs must log to, when `lmforge ui --backend` serves this workspace.

    A sqlite-backed `lmforge ui` records none: runs keep writing the sqlite file it reads.
    """
    return read_ui_record(workspace).get("mlflow_tracking_uri")


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


class SharedSafeClient(MlflowClient):
    """`MlflowClient` whose `log_inputs` survives two processes logging the same dataset at once.

    MLflow's SQL store looks the dataset (experiment, name, digest) up and then inserts it; on a shared
    PostgreSQL two runs doing so at the same moment collide on its unique key, and the loser's request
    is rolled back whole. Sent again, it finds the winner's row and links the run to it.
    """

    def log_inputs(self, run_id: str, datasets: Any = None, models: Any = None) -> None:
        from mlflow.exceptions import MlflowException

        for attempt in range(3):
            try:
                return super().log_inputs(run_id, datasets=datasets, models=models)
            except MlflowException as err:
                if attempt == 2 or "unique constraint" not in str(err).lower():
                    raise
        return None


class Tracker:
    """A thin layer over `MlflowClient` (explicit run ids: safe from threads and subprocesses)."""

    def __init__(self, workspace: Path, experiment: str) -> None:
        # with a tracking server MLflow prints "View run ... at" per ended run, between the terminal's stage lines
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.uri = tracking_uri(workspace)
        self.client = SharedSafeClient(self.uri)
        self.experiment_id = self._experiment_id(experiment, workspace)

    def _experiment_id(self, name: str, workspace: Path) -> str:
        """The experiment's id, created on first use; a server's default artifact root unless sqlite.

        On a shared server two workspaces (no common init lock) may create it at the same moment.
        """
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        try:
            return self.client.create_experiment(
                name, artifact_location=artifact_location(workspace) if self.uri.startswith("sqlite") else None)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id

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

    def end_running_children(self, parent_run_id: str, status: str) -> list[str]:
        """Nested runs of `parent_run_id` still RUNNING end with `status`; returns their ids."""
        running = self.client.search_runs([self.experiment_id], max_results=1000, filter_string=(
            f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"))
        for run in running:
            self.end_run(run.info.run_id, status)
        return [run.info.run_id for run in running]

    def mark_dead_runs(self, is_dead: Callable[[dict[str, str]], bool]) -> list[str]:
        """Runs still RUNNING whose process is gone (`is_dead(tags)`) become KILLED; returns their ids.

        Every experiment is searched: a run killed under another recipe's experiment is found now, not
        only when a later run starts in that experiment.
        """
        experiments = [experiment.experiment_id for experiment in self.client.search_experiments()]
        running = self.client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'",
                                          max_results=1000)
        dead = [r.info.run_id for r in running if is_dead(r.data.tags)]
        for run_id in dead:
            self.end_run(run_id, RunStatus.to_string(RunStatus.KILLED))
        return dead
