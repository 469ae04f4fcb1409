"""ingest: stream every source of the recipe into the document Parquet format.

Stats: `docs_in` counts every record that could have become a document, `docs_out` the documents
written, and each other record lands in `dropped/ingest/<reason>`. Problems are also counted per
file, `bad/<source>/<file>/<reason>`, and listed in `_SUCCESS.json` (`bad_inputs`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.stage import Stage, deferred
from tasks.ingest.config import FileSource, HfSource, IngestConfig, WikiOfflineSource, resolve_paths
from tasks.ingest.hub import revision_signature

VERSION = "3"   # 2: sampling by storage.sampling.unit_hash with its own salt; 3: charsets as browsers read them, BOM dropped


def external_inputs(config: IngestConfig) -> dict[str, Any]:
    """What the fingerprint must see besides the config, so a cron rebuild sees what changed upstream.

    File sources: each file's path, size and mtime. `hf` sources: the commit their revision resolves
    to (`tasks.ingest.hub.revision_signature`: pinned or `unresolved` offline, never a hung plan).
    """
    signature: dict[str, Any] = {}
    for source in config.sources:
        if isinstance(source, FileSource):
            files, missing = resolve_paths(source.paths)
            signature[source.name] = {"files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
                                      "missing": missing}
        elif isinstance(source, WikiOfflineSource):
            signature[source.name] = {lang: _file_signature(_wiki_offline_dir() / f"summaries_{lang}")
                                      for lang in source.languages}
        elif isinstance(source, HfSource):
            signature[source.name] = {"revision": revision_signature(source.dataset, source.revision)}
    return signature


def _file_signature(stem: Path) -> list[Any]:
    matches = sorted(stem.parent.glob(f"{stem.name}*.json"))
    return [[p.name, p.stat().st_size] for p in matches]


def _wiki_offline_dir() -> Path:
    from tasks.ingest.readers import wiki_offline_dir

    return wiki_offline_dir()


def samples(config: IngestConfig) -> bool:
    """The seed decides which documents a source keeps only when it is read at a sample_rate below 1."""
    return any(source.sample_rate < 1 for source in config.sources)


STAGE = Stage(name="ingest", version=VERSION, config=IngestConfig, run=deferred("tasks.ingest.stage:run"),
              provides=("documents",), seed_matters=samples, external_inputs=external_inputs,
              catalog_views={"documents": "**/*.parquet"}, headline=("docs_in", "docs_out"))
run = STAGE.run
__all__ = ["STAGE", "VERSION", "IngestConfig", "external_inputs", "run"]
