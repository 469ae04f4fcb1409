"""Telemetry off by default (cheap to import: the CLI calls it before anything heavy loads)."""
from __future__ import annotations

import os

TELEMETRY_OFF = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def disable_telemetry() -> None:
    """Telemetry off unless the user set these variables themselves."""
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)
