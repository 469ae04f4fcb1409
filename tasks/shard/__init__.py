"""shard: encode documents with the tokenizer into Parquet token shards (`doc_id, source, split, tokens`).

The manifest (`manifest.json`, `storage.formats.ShardManifest`) lists every shard with its token counts.
"""
from __future__ import annotations

from storage.stage import Stage, deferred
from tasks.shard.config import ShardConfig

VERSION = "2"   # 2: split by storage.sampling.unit_hash("shard-split", doc_id)

STAGE = Stage(name="shard", version=VERSION, config=ShardConfig, run=deferred("tasks.shard.stage:run"),
              reads=("documents", "tokenizer"), catalog_views={"token_shards": "shards/*.parquet"})
run = STAGE.run
__all__ = ["STAGE", "VERSION", "ShardConfig", "run"]
