"""The curate stage's work: FineWeb's curation recipe on datatrove, every threshold a knob, every drop counted.

Reads `ctx.inputs["documents"]` (document Parquet, any layout below it) and writes the kept
documents in the same schema to the stage output: `000_part-<rank>.parquet` (datatrove's rolling
writer numbers files per rank), plus, when `write_excluded`, each filter's removed documents in
`excluded/<filter>/_excluded-<rank>.parquet` (the leading `_` keeps them out of `document_files()`;
their metadata has `filter_reason`). Kept documents gain `language` and `language_score`; extracted
HTML documents get `content_type: text/plain` and `extracted_from: text/html`.

Steps, in FineWeb's order (each one switchable): sample, url_filter, extract (Trafilatura, HTML
only), language, gopher_repetition, gopher_quality, c4_quality, fineweb_quality, pii.

Stats (see `tasks.docpipe.funnel`): `docs_in`, `docs_out`, `dropped/<step>/<reason>` with
`docs_in == docs_out + sum(dropped/*)`, `funnel/<NN>_<step>/<source>/in|out`,
`by_source/<source>/docs_in|docs_out`, `flagged/extract/replacement_char`, `time_s/<NN>_<step>`.
The counters come from datatrove's per-rank `stats/<rank>.json`, summed over ranks.

Resumability: datatrove's logging dir, completion markers and the rank outputs live in `ctx.scratch`;
a rerun after a crash skips completed ranks and redoes the others. Outputs are hard-linked into
`ctx.output` once every rank completed. A corrupt input file is listed in `bad_inputs` and skipped;
a rank that fails does not stop the others, and the stage then fails naming it.
"""
from __future__ import annotations

from pathlib import Path

from storage.stage import StageContext, StageResult
from tasks.curate.config import CurateConfig
from tasks.docpipe.executors import build_executor, merged_step_stats, run_executor
from tasks.curate.filters import release_caches
from tasks.docpipe.funnel import check_accounting, link_tree, reset_incomplete_ranks, stage_stats
from tasks.curate.pipeline import build_pipeline
from tasks.docpipe.shared import prepare, record_problems




def run(config: CurateConfig, ctx: StageContext) -> StageResult:
    scratch, plan_file, bad_files = prepare(ctx)
    labels, pipeline = build_pipeline(config, scratch, plan_file, ctx.seed)
    executor = build_executor(pipeline, config.executor, scratch.logging_dir(), job_name="curate")
    reset_incomplete_ranks(executor.get_incomplete_ranks(), scratch)
    try:
        run_executor(executor, config.executor, "curate")
    finally:
        release_caches()  # the block lists and models loaded in this process (workers=1) are ~1 GB
    result = StageResult(stats=stage_stats(labels, merged_step_stats(scratch.logging_dir(), config.executor.tasks)))
    check_accounting(result.stats)
    record_problems(result, bad_files, scratch)
    link_tree(scratch.output, Path(ctx.output))
    result.artifacts = {"funnel_steps": labels, "language_backend": config.language.backend}
    return result
