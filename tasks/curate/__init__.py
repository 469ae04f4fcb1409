"""curate: FineWeb's curation recipe on datatrove, every threshold a knob, every drop counted.

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
from typing import Any

from storage.fingerprint import package_versions
from storage.stage import Stage, deferred
from tasks.curate.config import CurateConfig

VERSION = "3"   # 2: sampling by storage.sampling.unit_hash with its own salt; 3: quality filters tokenize a CLD2 code like zh-Hant as zh
BACKEND_PACKAGES = {"pycld2": "pycld2", "langid": "langid", "lingua": "lingua-language-detector",
                    "fasttext": "fasttext-numpy2-wheel"}


def external_inputs(config: CurateConfig) -> dict[str, Any]:
    """Besides the config, what decides the output: the libraries' versions and a local fastText model."""
    language = config.language
    backend = [BACKEND_PACKAGES[language.backend]] if language.enabled else []
    signature: dict[str, Any] = {"libraries": package_versions("datatrove", "trafilatura", "spacy", "tldextract",
                                                               *backend)}
    model = language.model_path
    if language.enabled and language.backend == "fasttext" and model is not None and Path(model).is_file():
        signature["language_model"] = [str(model), Path(model).stat().st_size, Path(model).stat().st_mtime_ns]
    return signature


def samples(config: CurateConfig) -> bool:
    """The seed decides which documents survive only when curate samples (sample_rate below 1)."""
    return config.sample_rate < 1


STAGE = Stage(name="curate", version=VERSION, config=CurateConfig, run=deferred("tasks.curate.stage:run"),
              reads=("documents",), provides=("documents",), seed_matters=samples, external_inputs=external_inputs,
              catalog_views={"documents": "**/*.parquet"}, headline=("docs_in", "docs_out"))
run = STAGE.run
__all__ = ["STAGE", "VERSION", "CurateConfig", "external_inputs", "run"]
