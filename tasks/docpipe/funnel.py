"""From datatrove's per-step counters (merged over ranks) to the stage's stats, and the scratch layout.

Stats of a document stage built on these helpers:

- `docs_in`: rows read (the reader's `documents`); `docs_out`: documents written.
- `dropped/<step>/<reason>`: every removed document once, so `docs_in == docs_out + sum(dropped/*)`.
  The reader's are `dropped/read/empty_text`, `dropped/read/bad_metadata`, `dropped/read/corrupt`.
  Each reason is counted where the document is dropped (by the step, or its wrapper in `steps`); a
  step whose in - out differs from its counted drops fails the stage, naming the step and the count.
- `funnel/<NN>_<step>/<source>/in` and `.../out`: documents entering and leaving each step, per source;
  `NN` is the step's fixed place in the recipe (a disabled step is absent, the others keep their number).
- `funnel/<NN>_<step>/<source>/bytes_in` and `.../bytes_out`: the UTF-8 bytes of their text (an
  extractor's `bytes_in` is the HTML it read). Outputs built before these counters existed lack them.
- `by_source/<source>/docs_in`, `by_source/<source>/docs_out`.
- `flagged/<step>/<what>`: documents marked but kept.
- `time_s/<NN>_<step>`: seconds spent in the step, summed over ranks.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from storage.stage import StageError


@dataclass(frozen=True)
class Scratch:
    """Where a stage keeps its resumable state: datatrove logs and markers, outputs until they are linked."""

    root: Path

    def logging_dir(self, name: str = "pipeline") -> Path:
        return self.root / "logs" / name

    def data(self, name: str) -> Path:
        return self.root / "data" / name

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def problems(self) -> Path:
        return self.root / "problems"


def reset_incomplete_ranks(incomplete: list[int], scratch: Scratch) -> None:
    """Removes what unfinished ranks of a crashed attempt left, so their rerun starts clean.

    Files are unlinked (not truncated in place) because a finished stage's output is hard-linked.
    """
    suffixes = tuple(f"-{rank:05d}.parquet" for rank in incomplete)
    prefixes = tuple(f"{rank:05d}-" for rank in incomplete)
    if scratch.output.is_dir() and suffixes:
        for path in scratch.output.rglob("*.parquet"):
            if path.name.endswith(suffixes):
                path.unlink()
    if scratch.problems.is_dir() and prefixes:
        for path in scratch.problems.glob("*.jsonl"):
            if path.name.startswith(prefixes):
                path.unlink()


def link_tree(source: Path, target: Path) -> list[Path]:
    """Hard-links (or copies, across filesystems) every file under `source` into `target`."""
    placed = []
    for path in sorted(source.rglob("*")) if source.is_dir() else []:
        if not path.is_file():
            continue
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)
        placed.append(destination)
    return placed


def stage_stats(labels: list[str], merged: list[dict[str, float]]) -> dict[str, float]:
    """The stage's stats from `[reader, *labelled steps, writer]` counters; see the module docstring.

    Raises StageError naming the step when a step (or the reader) lost documents without counting a reason.
    """
    reader, *steps, writer = merged
    if len(steps) != len(labels):
        raise StageError(f"internal: {len(steps)} step stats for {len(labels)} steps")
    stats: dict[str, float] = {"docs_in": reader.get("documents", 0), "docs_out": writer.get("total", 0)}
    read_drops = _reasons(reader, "dropped_")
    stats.update({f"dropped/read/{reason}": value for reason, value in read_drops.items()})
    _check_explained("read", reader.get("documents", 0), reader.get("forwarded", 0), read_drops)
    _per_source(stats, reader, "in", "by_source/{}/docs_in")
    _per_source(stats, writer, "out", "by_source/{}/docs_out")
    for label, step in zip(labels, steps):
        _step_stats(stats, label, step)
    return {key: int(value) if float(value).is_integer() and not key.startswith("time_s/") else value
            for key, value in stats.items()}


def _name(label: str) -> str:
    return label.split("_", 1)[1]


def _reasons(counters: dict[str, float], prefix: str) -> dict[str, float]:
    """`<prefix><reason>` counters by reason, zeros left out."""
    return {key.removeprefix(prefix): value for key, value in counters.items() if key.startswith(prefix) and value}


def _per_source(stats: dict[str, float], counters: dict[str, float], direction: str, pattern: str) -> None:
    for key, value in counters.items():
        if key.startswith(f"{direction}/"):
            stats[pattern.format(key.split("/", 1)[1])] = value


def _step_stats(stats: dict[str, float], label: str, step: dict[str, float]) -> None:
    name = _name(label)
    _per_source(stats, step, "in", f"funnel/{label}/{{}}/in")
    _per_source(stats, step, "out", f"funnel/{label}/{{}}/out")
    _per_source(stats, step, "bytes_in", f"funnel/{label}/{{}}/bytes_in")
    _per_source(stats, step, "bytes_out", f"funnel/{label}/{{}}/bytes_out")
    drops = _reasons(step, "dropped_")
    stats.update({f"dropped/{name}/{reason}": value for reason, value in drops.items()})
    stats.update({f"flagged/{name}/{what}": value for what, value in _reasons(step, "flagged_").items()})
    docs_in = sum(v for k, v in step.items() if k.startswith("in/"))
    docs_out = sum(v for k, v in step.items() if k.startswith("out/"))
    _check_explained(label, docs_in, docs_out, drops)
    stats[f"time_s/{label}"] = round(step.get("time_s", 0.0), 3)


def _check_explained(step: str, docs_in: float, docs_out: float, drops: dict[str, float]) -> None:
    """A step's losses must be exactly its counted drops: a loss without a reason is an error, never booked."""
    unexplained = docs_in - docs_out - sum(drops.values())
    if unexplained:
        what = "lost" if unexplained > 0 else "counted as dropped more than it lost:"
        raise StageError(f"step {step} {what} {abs(unexplained):,.0f} documents without a counted reason "
                         f"(in {docs_in:,.0f}, out {docs_out:,.0f}, dropped with a reason {sum(drops.values()):,.0f})")


def check_accounting(stats: dict[str, float]) -> None:
    """Every document read is either written or dropped with a reason; anything else is an error."""
    dropped = sum(v for k, v in stats.items() if k.startswith("dropped/"))
    lost = stats["docs_in"] - stats["docs_out"] - dropped
    if lost:
        raise StageError(f"{lost:,.0f} documents unaccounted for: docs_in {stats['docs_in']:,.0f} != docs_out "
                         f"{stats['docs_out']:,.0f} + dropped {dropped:,.0f} (lost between steps or at the writer)")
