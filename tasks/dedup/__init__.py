"""dedup: MinHash near-duplicates (FineWeb), exact duplicates, decontamination against eval sets.

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

from typing import Any

from storage.fingerprint import file_signature, package_versions
from storage.stage import Stage, deferred
from tasks.dedup.config import DedupConfig

VERSION = "1"


def external_inputs(config: DedupConfig) -> dict[str, Any]:
    """Besides the config, what decides the output: datatrove's version and the eval files' content."""
    signature: dict[str, Any] = {"libraries": package_versions("datatrove", "spacy")}
    if config.decontaminate.enabled:
        signature["eval_sets"] = [file_signature(path) for path in config.decontaminate.eval_sets]
    return signature


STAGE = Stage(name="dedup", version=VERSION, config=DedupConfig, run=deferred("tasks.dedup.stage:run"),
              reads=("documents",), provides=("documents",), external_inputs=external_inputs,
              catalog_views={"documents": "**/*.parquet"}, headline=("docs_in", "docs_out", "minhash/clusters"))
run = STAGE.run
__all__ = ["STAGE", "VERSION", "DedupConfig", "external_inputs", "run"]
