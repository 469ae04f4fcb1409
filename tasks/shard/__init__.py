"""shard: encode documents with the tokenizer into Parquet token shards (`doc_id, source, split, tokens`).

The manifest (`manifest.json`, `storage.formats.ShardManifest`) lists every shard with its token counts;
with `mixture`, also how the training tokens were mixed by source (`tasks.shard.mixture`).
"""
from __future__ import annotations

from storage.stage import Stage, deferred
from tasks.shard.config import ShardConfig

VERSION = "2"   # 2: split by storage.sampling.unit_hash("shard-split", doc_id)


def mixes(config: ShardConfig) -> bool:
    """The seed decides which training documents a mixture keeps or repeats; without one it decides nothing."""
    return config.mixture is not None


STAGE = Stage(name="shard", version=VERSION, config=ShardConfig, run=deferred("tasks.shard.stage:run"),
              reads=("documents", "tokenizer"), seed_matters=mixes, catalog_views={"token_shards": "shards/*.parquet"},
              headline=("tokens_train", "tokens_val", "mixture/*/epochs"))
run = STAGE.run
__all__ = ["STAGE", "VERSION", "ShardConfig", "run"]
