"""Where the documents ran out: a walk back through the upstream `_SUCCESS.json` records.

A stage that keeps nothing commits an empty output, and every later reader passes the emptiness
on; the first stage that cannot work without input explains it in one line, naming the stage that
dropped the last documents and its largest drops:

    no documents left: curate kept 0 of 26,227 documents; largest drops: language 26,227 (en 9,611, es 8,401, fr 8,215)

Each committed output `<workspace>/stages/<stage>/<fingerprint>/` holds a `_SUCCESS.json` with
`stage`, `stats` (`docs_in`, `docs_out`, `dropped/<step>/<reason>`), `input_stages` (input key ->
upstream stage) and `input_fingerprints` (input key -> upstream fingerprint).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.workspace import SUCCESS_FILE

MAX_STEPS = 4      # steps named in the summary
MAX_REASONS = 3    # reasons named per step


@dataclass(frozen=True)
class StageRecord:
    """One committed stage output, as its `_SUCCESS.json` describes it."""

    stage: str
    directory: Path
    stats: dict[str, float]
    upstream: tuple[Path, ...]   # the directories of its inputs, in input-key order

    @property
    def passes_documents(self) -> bool:
        return "docs_out" in self.stats


def read_record(directory: Path) -> StageRecord | None:
    """The record of a committed stage output; None for a directory without a readable `_SUCCESS.json`."""
    try:
        success = json.loads((Path(directory) / SUCCESS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(success, dict):
        return None
    stage = str(success.get("stage") or Path(directory).parent.name)
    return StageRecord(stage, Path(directory), dict(success.get("stats") or {}), _upstream(Path(directory), success))


def _upstream(directory: Path, success: dict[str, Any]) -> tuple[Path, ...]:
    """`<workspace>/stages/<input stage>/<fingerprint>` for each input (the stage found by fingerprint
    when an older record has no `input_stages`)."""
    stages_dir = directory.parent.parent
    if stages_dir.name != "stages":
        return ()
    names = success.get("input_stages") or {}
    found = []
    for key, fingerprint in (success.get("input_fingerprints") or {}).items():
        if key in names:
            found.append(stages_dir / names[key] / fingerprint)
        else:
            found.extend(sorted(p.parent for p in stages_dir.glob(f"*/{fingerprint}/{SUCCESS_FILE}")))
    return tuple(found)


def where_emptied(directory: Path) -> StageRecord | None:
    """The stage (this one or upstream) that received documents and passed none on; None if not found.

    From a stage that received none, the walk follows its inputs that passed no documents either.
    """
    record = read_record(directory)
    seen: set[Path] = set()
    while record is not None and record.directory not in seen:
        seen.add(record.directory)
        if record.stats.get("docs_in", 0) > 0 and record.stats.get("docs_out", 0) == 0:
            return record
        record = next((r for r in map(read_record, record.upstream)
                       if r is not None and r.passes_documents and r.stats.get("docs_out", 0) == 0), None)
    return None


def drop_summary(stats: dict[str, float]) -> str:
    """`language 16,175 (en 9,000, es 7,175), c4_quality 4,886 (...)`: the largest drops by step, then reason."""
    by_step: dict[str, dict[str, float]] = {}
    for key, value in stats.items():
        parts = key.split("/", 2)
        if parts[0] == "dropped" and len(parts) == 3 and value:
            by_step.setdefault(parts[1], {})[parts[2]] = value
    steps = sorted(by_step.items(), key=lambda item: (-sum(item[1].values()), item[0]))[:MAX_STEPS]
    return ", ".join(f"{step} {sum(reasons.values()):,.0f} ({_largest(reasons)})" for step, reasons in steps)


def _largest(reasons: dict[str, float]) -> str:
    top = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{reason} {count:,.0f}" for reason, count in top[:MAX_REASONS])
    return shown + (", ..." if len(top) > MAX_REASONS else "")


def empty_input_message(input_dir: Path, what: str = "documents") -> str:
    """One line saying why `input_dir` (a committed stage output) holds no `what`: the upstream stage
    where the documents ran out, with its largest drops."""
    record = where_emptied(Path(input_dir))
    if record is None:
        return f"no {what} left: {input_dir} holds none, and no upstream _SUCCESS.json records a stage that dropped them"
    drops = drop_summary(record.stats)
    return (f"no {what} left: {record.stage} kept 0 of {record.stats['docs_in']:,.0f} documents"
            + (f"; largest drops: {drops}" if drops else ""))
