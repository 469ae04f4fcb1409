"""The datatrove internals tasks/docpipe/executors.py relies on, checked against the installed datatrove."""
from __future__ import annotations

import inspect
import json
import re
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from datatrove.executor.base import PipelineExecutor
from datatrove.utils.stats import MetricStats
from packaging.specifiers import SpecifierSet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/tasks: the real-data helper
import curatedata  # noqa: E402

from storage.stage import StageError  # noqa: E402
from tasks.docpipe.config import ExecutorConfig  # noqa: E402
from tasks.docpipe.executors import (RUN_FOR_RANK_PARAMETERS, IsolatingLocalExecutor, build_executor,  # noqa: E402
                                     datatrove_api_problems, merged_step_stats, run_executor)
from tasks.docpipe.funnel import Scratch  # noqa: E402
from tasks.docpipe.steps import DocumentParquetWriter, DocumentReader, FunnelFilter, HashSampler, write_plan  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def test_the_overridden_datatrove_method_is_unchanged():
    problems = datatrove_api_problems()
    assert not problems, f"datatrove changed {'; '.join(problems)}; re-check IsolatingLocalExecutor"
    ours = tuple(inspect.signature(IsolatingLocalExecutor._run_for_rank).parameters)
    assert ours == RUN_FOR_RANK_PARAMETERS, "IsolatingLocalExecutor._run_for_rank no longer matches datatrove's"


def test_the_installed_datatrove_is_in_the_pinned_range():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in dependencies if d.startswith("datatrove"))
    specifier = SpecifierSet(re.sub(r"^datatrove(\[[^\]]*\])?", "", pin).split("#")[0].strip())
    assert version("datatrove") in specifier, f"datatrove {version('datatrove')} is outside {pin}"


def test_a_changed_signature_is_reported(monkeypatch):
    """The guard itself can fail: a datatrove whose _run_for_rank lost `node_rank` is named."""
    monkeypatch.setattr(PipelineExecutor, "_run_for_rank", lambda self, rank, local_rank=0: None)
    (problem,) = datatrove_api_problems()
    assert "_run_for_rank now takes ('self', 'rank', 'local_rank')" in problem


def test_merged_step_stats_reads_what_datatrove_writes(tmp_path):
    """A real two-rank run: one stats file per rank, one object per step in pipeline order, summed right."""
    docs = curatedata.write_documents(tmp_path / "docs", curatedata.wiki_documents("en", 40), row_group_rows=5)
    scratch = Scratch(tmp_path / "scratch")
    scratch.root.mkdir(parents=True)
    plan, _ = write_plan(scratch.root, docs)
    pipeline = [DocumentReader(str(plan), str(scratch.problems)),
                FunnelFilter("00_sample", HashSampler(0.5, seed=3), str(scratch.problems)),
                DocumentParquetWriter(str(scratch.output))]
    config = ExecutorConfig(tasks=2)
    run_executor(build_executor(pipeline, config, scratch.logging_dir()), config, "test")

    per_rank = [json.loads((scratch.logging_dir() / "stats" / f"{rank:05d}.json").read_text()) for rank in (0, 1)]
    for steps in per_rank:
        assert [step["name"] for step in steps] == [step.stats.name for step in pipeline]
        assert all(set(step) >= {"name", "time_stats", "stats"} for step in steps)
    merged = merged_step_stats(scratch.logging_dir(), 2)
    reader, sampler, writer = merged
    assert reader["documents"] == 40 == sum(MetricStats.from_dict(s[0]["stats"]["documents"]).total for s in per_rank)
    assert sampler["in/wiki_en"] == 40
    assert sampler["out/wiki_en"] == writer["total"] == 40 - sampler["dropped_not_sampled"] > 0
    assert all(step["time_s"] >= 0 for step in merged)


def test_a_stats_file_in_another_layout_is_a_clear_error(tmp_path):
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "00000.json").write_text(json.dumps({"reader": {"documents": 3}}))
    with pytest.raises(StageError, match="datatrove changed the layout of its stats files"):
        merged_step_stats(tmp_path, 1)
