"""Stage fingerprints: a short hash of what determines a stage's output."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
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


def file_signature(path: str | Path) -> list[Any]:
    """[path, size, sha256] of a file whose content decides an output (None, None when it is missing)."""
    path = Path(path)
    if not path.is_file():
        return [str(path), None, None]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return [str(path), path.stat().st_size, digest.hexdigest()]


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of the libraries whose behaviour decides a stage's output."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
