"""Funnel accounting on real datatrove runs: every lost document has a counted reason, or the stage fails."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from datatrove.data import Document as DtDocument
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/tasks: the real-data helper
import curatedata  # noqa: E402

from storage.stage import StageError  # noqa: E402
from tasks.docpipe.config import ExecutorConfig  # noqa: E402
from tasks.docpipe.executors import build_executor, merged_step_stats, run_executor  # noqa: E402
from tasks.docpipe.funnel import Scratch, check_accounting, stage_stats  # noqa: E402
from tasks.docpipe.steps import (DocumentParquetWriter, DocumentReader, FunnelFilter, FunnelStep,  # noqa: E402
                                 ReasonedDrops, write_plan)


class SilentlyLosesEveryThird(PipelineStep):
    """A step with a bug: it forgets every third document without counting anything."""

    name = "leaky"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for index, doc in enumerate(data):
            if index % 3 != 2:
                yield doc


class DropsEveryThird(ReasonedDrops, SilentlyLosesEveryThird):
    """The same drops, counted as datatrove's dedup filters count them: `dropped`, without a reason."""

    drop_reason = "duplicate"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for index, doc in enumerate(data):
            if index % 3 == 2:
                self.stat_update("dropped")
                continue
            yield doc


class BareFalse(BaseFilter):
    """A filter that says False without a reason for documents whose id ends in 0."""

    name = "bare"

    def filter(self, doc: DtDocument) -> bool:
        return not doc.id.endswith("0")


def run_steps(tmp_path: Path, labelled: list[tuple[str, PipelineStep]], tasks: int = 2) -> dict[str, float]:
    """Real wiki documents through reader -> steps -> writer on datatrove's executor; the stage's stats."""
    docs = curatedata.write_documents(tmp_path / "docs", curatedata.wiki_documents("en", 30), row_group_rows=5)
    scratch = Scratch(tmp_path / "scratch")
    scratch.root.mkdir(parents=True)
    plan, _ = write_plan(scratch.root, docs)
    pipeline = [DocumentReader(str(plan), str(scratch.problems)), *(step for _, step in labelled),
                DocumentParquetWriter(str(scratch.output))]
    config = ExecutorConfig(tasks=tasks)
    run_executor(build_executor(pipeline, config, scratch.logging_dir()), config, "test")
    return stage_stats([label for label, _ in labelled], merged_step_stats(scratch.logging_dir(), tasks))


def test_a_step_that_silently_loses_documents_fails_the_stage_naming_it_and_the_count(tmp_path):
    leaky = FunnelStep("05_leaky", SilentlyLosesEveryThird())
    with pytest.raises(StageError, match=r"step 05_leaky lost (\d+) documents without a counted reason") as err:
        run_steps(tmp_path, [("05_leaky", leaky)])
    # 30 documents in 6 row groups of 5, dealt to 2 ranks: each rank sees 15 and forgets 5
    assert "lost 10 documents" in str(err.value) and "(in 30, out 20" in str(err.value)


def test_drops_counted_without_a_reason_get_the_steps_only_reason_where_they_happen(tmp_path):
    stats = run_steps(tmp_path, [("02_minhash", FunnelStep("02_minhash", DropsEveryThird()))])
    assert stats["dropped/minhash/duplicate"] == 10 and stats["docs_out"] == 20
    check_accounting(stats)


def test_a_filter_saying_false_without_a_reason_fails_unless_the_wrapper_knows_it(tmp_path):
    bare = FunnelFilter("03_bare", BareFalse(), str(tmp_path / "problems"))
    with pytest.raises(StageError, match=r"step 03_bare lost \d+ documents without a counted reason"):
        run_steps(tmp_path / "a", [("03_bare", bare)])
    reasoned = FunnelFilter("03_bare", BareFalse(), str(tmp_path / "problems"), reason="id_ends_in_zero")
    stats = run_steps(tmp_path / "b", [("03_bare", reasoned)])
    assert stats["dropped/bare/id_ends_in_zero"] == 30 - stats["docs_out"] > 0
    check_accounting(stats)


def test_each_step_counts_the_bytes_of_the_text_it_reads_and_keeps(tmp_path):
    reasoned = FunnelFilter("03_bare", BareFalse(), str(tmp_path / "problems"), reason="id_ends_in_zero")
    stats = run_steps(tmp_path, [("02_minhash", FunnelStep("02_minhash", DropsEveryThird())), ("03_bare", reasoned)])
    text = [doc.text for doc in curatedata.wiki_documents("en", 30)]
    assert stats["funnel/02_minhash/wiki_en/bytes_in"] == sum(len(t.encode("utf-8")) for t in text)
    assert stats["funnel/02_minhash/wiki_en/bytes_out"] == stats["funnel/03_bare/wiki_en/bytes_in"]
    assert 0 < stats["funnel/03_bare/wiki_en/bytes_out"] < stats["funnel/03_bare/wiki_en/bytes_in"]
    check_accounting(stats)                   # byte counters are not documents: the accounting is unchanged


def test_check_accounting_names_documents_lost_between_steps():
    stats = {"docs_in": 10, "docs_out": 6, "dropped/language/fr": 3}
    with pytest.raises(StageError, match="1 documents unaccounted for: docs_in 10 != docs_out 6 \\+ dropped 3"):
        check_accounting(stats)
    check_accounting({**stats, "dropped/language/de": 1})


def test_a_rank_run_again_lists_its_problems_once(tmp_path):
    """A rerun (or a retried Ray worker) starts the rank's problem file afresh; other ranks' files stay."""
    from tasks.docpipe.steps import ProblemLog, read_problems

    first_attempt = ProblemLog(str(tmp_path), "read")
    first_attempt.add(0, "a.parquet", "corrupt_parquet", "bad footer")
    first_attempt.add(1, "b.parquet", "corrupt_parquet", "bad footer")
    first_attempt.add(0, "c.parquet", "bad_metadata", "not a JSON object")   # then rank 0 crashed
    retry = ProblemLog(str(tmp_path), "read")
    retry.add(0, "a.parquet", "corrupt_parquet", "bad footer")
    retry.add(0, "c.parquet", "bad_metadata", "not a JSON object")
    retry.add(0, "d.parquet", "bad_metadata", "not a JSON object")
    assert [(r["path"], r["reason"]) for r in read_problems(tmp_path)] == [
        ("a.parquet", "corrupt_parquet"), ("c.parquet", "bad_metadata"), ("d.parquet", "bad_metadata"),
        ("b.parquet", "corrupt_parquet")]
