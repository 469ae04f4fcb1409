"""What the curate and dedup stages share around their pipelines: input, read plan, problems."""
from __future__ import annotations

import json
from pathlib import Path

from storage.stage import StageContext, StageError, StageResult
from tasks.docpipe.funnel import Scratch
from tasks.docpipe.steps import read_problems, write_plan


def input_documents(ctx: StageContext) -> Path:
    """The upstream document directory; a clear error when the recipe gives none."""
    if "documents" not in ctx.inputs:
        raise StageError(f"{ctx.stage} needs input 'documents' (an ingest, curate or dedup stage before it)")
    path = Path(ctx.inputs["documents"])
    if not path.is_dir():
        raise StageError(f"{ctx.stage}: input 'documents' is not a directory: {path}")
    return path


def prepare(ctx: StageContext) -> tuple[Scratch, Path, list[dict[str, str]]]:
    """The scratch layout, the read plan (kept across attempts) and the unreadable input files.

    An input without documents (no Parquet file, or only files without rows) is a valid, empty
    input. Fails early when it has files and none of them is readable document Parquet.
    """
    scratch = Scratch(Path(ctx.scratch))
    scratch.root.mkdir(parents=True, exist_ok=True)
    input_dir = input_documents(ctx)
    plan_file, bad_files = write_plan(scratch.root, input_dir)
    if bad_files and not json.loads(plan_file.read_text())["units"]:
        problems = "; ".join(f"{b['path']}: {b['reason']} ({b['detail']})" for b in bad_files[:5])
        raise StageError(f"no readable document Parquet under {input_dir}: {problems}")
    return scratch, plan_file, bad_files


def record_problems(result: StageResult, bad_files: list[dict[str, str]], scratch: Scratch) -> None:
    """Unreadable files (from the plan) and bad rows or documents (logged by the ranks) into `bad_inputs`."""
    for problem in [*bad_files, *read_problems(scratch.problems)]:
        result.bad(problem["path"], problem["reason"], problem.get("detail", ""), problem.get("where"))
    result.count("bad_inputs", len(result.bad_inputs))
