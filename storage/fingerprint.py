"""Stage fingerprints: a short hash of what determines a stage's output."""
from __future__ import annotations

import hashlib
import json
from typing import Any

FINGERPRINT_LENGTH = 12


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal values hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(stage: str, version: str, output_fields: dict[str, Any], input_fingerprints: dict[str, str],
                extra: dict[str, Any] | None = None) -> str:
    """sha256(stage, VERSION, output-changing config, upstream fingerprints, external inputs)[:12]."""
    payload = {
        "stage": stage,
        "version": version,
        "config": output_fields,
        "inputs": input_fingerprints,
        "external": extra or {},
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:FINGERPRINT_LENGTH]
