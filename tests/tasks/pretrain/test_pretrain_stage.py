"""Bad input is reported before any worker starts, with the file or field named."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shardfixture as sf

from storage.stage import StageError
from tasks.pretrain import PretrainConfig, run
from tasks.training.launch import exclusive


@pytest.fixture
def shards(tmp_path: Path, shared_data: Path) -> Path:
    return sf.write_shards(tmp_path / "shard", sf.shakespeare_docs(shared_data, 200), row_group_rows=16)


def edit_manifest(shard_dir: Path, **changes: object) -> None:
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    manifest.update(changes)
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))


def empty_shards(shards: Path) -> None:
    for path in (shards / "shards").glob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.slice(0, 0), path)
    manifest = json.loads((shards / "manifest.json").read_text())
    edit_manifest(shards, shards=[{**s, "rows": 0, "tokens": 0, "tokens_train": 0, "tokens_val": 0}
                                  for s in manifest["shards"]], tokens_by_source={}, total_tokens=0)


def retype_tokens(shards: Path) -> None:
    path = shards / "shards" / "shard-00001.parquet"
    table = pq.read_table(path)
    tokens = table["tokens"].cast(pa.list_(pa.uint32()))
    pq.write_table(table.set_column(table.schema.get_field_index("tokens"), "tokens", tokens), path)


def truncate_shard(shards: Path) -> None:
    path = shards / "shards" / "shard-00000.parquet"
    path.write_bytes(path.read_bytes()[:300])


CASES: dict[str, tuple[Callable[[Path], None], dict, str]] = {
    "no manifest": (lambda s: (s / "manifest.json").unlink(), {}, r"manifest\.json: missing"),
    "shard missing": (lambda s: (s / "shards" / "shard-00001.parquet").unlink(), {},
                      r"shard-00001\.parquet: listed in the manifest but missing"),
    "no shards listed": (lambda s: edit_manifest(s, shards=[], tokens_by_source={}, total_tokens=0), {},
                         "pretrain has nothing to train on: "),
    "manifest field wrong": (lambda s: edit_manifest(s, token_dtype="int8"), {},
                             r"manifest\.json: field 'token_dtype': Input should be 'uint16' or 'uint32'"),
    "empty shards": (empty_shards, {}, r"pretrain has nothing to train on \(.*: 0 rows, no training tokens\)"),
    "wrong token type": (retype_tokens, {}, r"shard-00001\.parquet: column 'tokens' is list<element: uint32>.*"
                                            "token_dtype is uint16"),
    "truncated file": (truncate_shard, {}, r"shard-00000\.parquet: not a readable Parquet file"),
    "no eot": (lambda s: edit_manifest(s, eot_token=None, eot_id=None), {}, "field 'eot_id' is None"),
    "bert without specials": (lambda s: edit_manifest(s, special_tokens={"<|endoftext|>": 256}),
                              {"model": {"preset": "bert-nano"}}, "special_tokens lacks .CLS., .SEP., .MASK."),
    "too few row groups": (lambda s: None, {"nproc_per_node": 16},
                           "row groups hold training rows but world size is 16"),
    "no val rows": (lambda s: sf.write_shards(s, sf.shakespeare_docs(sf.REPO_ROOT / ".." / "shared" / "data", 200),
                                              row_group_rows=16, val_fraction=0.0),
                    {"eval_every": 5}, "eval_every=5 but the shards hold no 'val' rows"),
    "batch not a multiple": (lambda s: None, {"batch_tokens": 1000},
                             r"batch_tokens=1000 must be a multiple of seq_len x world size = 64 x 1 = 64; "
                             "e.g. batch_tokens=1024"),
    "micro batch does not divide": (lambda s: None, {"micro_batch": 5},
                                    r"micro_batch=5 does not divide the 32 sequences .* \[1, 2, 4, 8, 16, 32\]"),
    "warmup too long": (lambda s: None, {"optim": {"warmup_steps": 50}}, "warmup_steps=50 exceeds the run's 20"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_before_launching_workers(case: str, tmp_path: Path, shards: Path) -> None:
    breaker, overrides, message = CASES[case]
    breaker(shards)
    ctx = sf.stage_context(tmp_path / "stage", shards)
    with pytest.raises(StageError, match=message):
        run(PretrainConfig.model_validate(sf.nano_config(**overrides)), ctx)
    assert not (ctx.scratch / "run").exists()                  # no trainer config, no torchrun


def test_missing_shard_input_is_named(tmp_path: Path, shards: Path) -> None:
    ctx = sf.stage_context(tmp_path / "stage", shards)
    ctx.inputs.pop("shard")
    with pytest.raises(StageError, match="ctx.inputs has no 'shard' entry"):
        run(PretrainConfig.model_validate(sf.nano_config()), ctx)


def test_a_second_run_of_the_same_fingerprint_is_refused(tmp_path: Path, shards: Path) -> None:
    ctx = sf.stage_context(tmp_path / "stage", shards)
    with exclusive(ctx.scratch, "pretrain"):
        with pytest.raises(StageError, match="another pretrain run with this fingerprint is running"):
            run(PretrainConfig.model_validate(sf.nano_config()), ctx)
    assert not (ctx.scratch / "run" / "torchrun.log").exists()
