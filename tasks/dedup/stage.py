"""The dedup stage's work: MinHash near-duplicates (FineWeb), exact duplicates, decontamination against eval sets.

Reads `ctx.inputs["documents"]`, writes the surviving documents in the same schema to the stage
output (`000_part-<rank>.parquet`). Each method is a switch; the passes run through datatrove
executors with their completion markers under `ctx.scratch/logs/<pass>/`:

1. exact (if enabled): `ExactDedupSignature` (tasks) -> `ExactFindDedups` (1 task);
2. minhash (if enabled): `MinhashDedupSignature` (tasks; it reads the stream after the exact filter,
   so both filters see the document numbering they were built for) -> `MinhashDedupBuckets`
   (one task per bucket) -> `MinhashDedupCluster` (1 task);
3. decontaminate (if enabled): an n-gram index of the eval files, built in-process;
4. the filter pass (tasks): reader -> exact filter -> MinHash filter -> decontamination -> writer.

Stats: `docs_in`, `docs_out`, `dropped/exact/duplicate`, `dropped/minhash/duplicate`,
`dropped/decontaminate/<eval set>` (or `flagged/decontaminate/<eval set>` in flag mode),
`minhash/clusters` (clusters of two or more near-duplicates), `decontaminate/<eval set>/ngrams`,
`decontaminate/<eval set>/texts` and `.../texts_shorter_than_n_gram` (eval texts with fewer words than
`n_gram`: decontamination cannot find a page that quotes only them),
the funnel `funnel/<NN>_<step>/<source>/in|out` and `by_source/...` (see `tasks.docpipe.funnel`);
`docs_in == docs_out + sum(dropped/*)`. Eval sets are named `<folder>-<stem>` (`squad-dev-v2.0-subset`).
"""
from __future__ import annotations

from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (
    ExactDedupConfig,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupSignature,
)
from datatrove.pipeline.dedup.minhash import MinhashConfig as DtMinhashConfig
from datatrove.utils.hashing import HashConfig

from storage.stage import StageContext, StageResult
from tasks.docpipe.executors import ExecutorConfig, build_executor, merged_step_stats, run_executor
from tasks.docpipe.funnel import check_accounting, link_tree, reset_incomplete_ranks, stage_stats
from tasks.docpipe.shared import prepare, record_problems
from tasks.docpipe.steps import DocumentParquetWriter, DocumentReader, FunnelFilter, FunnelStep
from tasks.dedup.config import DedupConfig
from tasks.dedup.evalsets import build_index
from tasks.dedup.steps import Decontaminate, ExactDuplicateFilter, MinhashDuplicateFilter, normalized_text


class DedupRun:
    """One execution of the stage: the scratch layout, the read plan, and the passes in order."""

    def __init__(self, config: DedupConfig, ctx: StageContext) -> None:
        self.config = config
        self.scratch, self.plan_file, self.bad_files = prepare(ctx)
        self.exact = ExactDedupConfig(content_getter=normalized_text)
        mh = config.minhash
        self.minhash = DtMinhashConfig(n_grams=mh.n_grams, num_buckets=mh.num_buckets,
                                       hashes_per_bucket=mh.hashes_per_bucket, seed=mh.seed,
                                       hash_config=HashConfig(precision=mh.precision, hash_fc=mh.hash_fc))

    def reader(self, pass_name: str) -> DocumentReader:
        """A reader for one pass; only the filter pass's reader reports bad rows (once, not per pass)."""
        problems = self.scratch.problems if pass_name == "filter" else self.scratch.logging_dir(pass_name) / "problems"
        return DocumentReader(str(self.plan_file), str(problems))

    def run_pass(self, name: str, pipeline: list[PipelineStep], tasks: int | None = None) -> list[dict[str, float]]:
        config: ExecutorConfig = self.config.executor
        tasks = config.tasks if tasks is None else tasks
        executor = build_executor(pipeline, config, self.scratch.logging_dir(name), tasks=tasks, job_name=f"dedup-{name}")
        if name == "filter":
            reset_incomplete_ranks(executor.get_incomplete_ranks(), self.scratch)
        run_executor(executor, config, f"dedup {name}")
        return merged_step_stats(self.scratch.logging_dir(name), tasks)

    def exact_filter(self) -> list[PipelineStep]:
        if not self.config.exact.enabled:
            return []
        return [ExactDuplicateFilter(data_folder=str(self.scratch.data("exact_dups")), config=self.exact)]

    def exact_passes(self) -> None:
        sigs, dups = str(self.scratch.data("exact_sigs")), str(self.scratch.data("exact_dups"))
        signature = ExactDedupSignature(output_folder=sigs, config=self.exact)
        self.run_pass("exact_signatures", [self.reader("exact_signatures"), signature])
        self.run_pass("exact_find", [ExactFindDedups(data_folder=sigs, output_folder=dups, config=self.exact)], tasks=1)

    def minhash_passes(self) -> float:
        """The first three MinHash stages; returns the number of clusters found."""
        sigs, buckets = str(self.scratch.data("minhash_sigs")), str(self.scratch.data("minhash_buckets"))
        clusters = str(self.scratch.data("minhash_clusters"))
        signature = MinhashDedupSignature(output_folder=sigs, config=self.minhash,
                                          language=self.config.minhash.language)
        self.run_pass("minhash_signatures", [self.reader("minhash_signatures"), *self.exact_filter(), signature])
        find_pairs = MinhashDedupBuckets(input_folder=sigs, output_folder=buckets, config=self.minhash)
        self.run_pass("minhash_buckets", [find_pairs], tasks=self.config.minhash.num_buckets)
        cluster = MinhashDedupCluster(input_folder=buckets, output_folder=clusters, config=self.minhash,
                                      save_cluster_id=True)
        merged = self.run_pass("minhash_clusters", [cluster], tasks=1)
        return merged[0].get("clusters", 0)

    def filter_steps(self) -> list[tuple[str, PipelineStep]]:
        steps: list[tuple[str, PipelineStep]] = []
        if self.config.exact.enabled:
            steps.append(("01_exact", FunnelStep("01_exact", self.exact_filter()[0])))
        if self.config.minhash.enabled:
            inner = MinhashDuplicateFilter(input_folder=str(self.scratch.data("minhash_clusters")))
            steps.append(("02_minhash", FunnelStep("02_minhash", inner)))
        if self.config.decontaminate.enabled:
            opts = self.config.decontaminate
            inner = Decontaminate(str(self.scratch.data("decont_index")), opts.n_gram, opts.mode, opts.language)
            steps.append(("03_decontaminate", FunnelFilter("03_decontaminate", inner, str(self.scratch.problems))))
        return steps

    def filter_pass(self) -> tuple[list[str], list[dict[str, float]]]:
        steps = self.filter_steps()
        pipeline = [self.reader("filter"), *(step for _, step in steps), DocumentParquetWriter(str(self.scratch.output))]
        return [label for label, _ in steps], self.run_pass("filter", pipeline)


def run(config: DedupConfig, ctx: StageContext) -> StageResult:
    job = DedupRun(config, ctx)
    extra: dict[str, float] = {}
    if config.exact.enabled:
        job.exact_passes()
    if config.minhash.enabled:
        extra["minhash/clusters"] = job.minhash_passes()
    if config.decontaminate.enabled:
        opts = config.decontaminate
        counts = build_index(opts.eval_sets, opts.n_gram, opts.language, job.scratch.data("decont_index"))
        extra.update({f"decontaminate/{name}/{what}": n for name, by in counts.items() for what, n in by.items()})
    labels, merged = job.filter_pass()
    result = StageResult(stats={**stage_stats(labels, merged), **extra})
    check_accounting(result.stats)
    record_problems(result, job.bad_files, job.scratch)
    link_tree(job.scratch.output, Path(ctx.output))
    result.artifacts = {"funnel_steps": labels}
    return result
