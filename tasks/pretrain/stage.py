"""The pretrain stage's core: check the shards, write the trainer JSON, run torchrun, collect the results.

Training happens in `ctx.scratch/run/`, which survives a crash for the same fingerprint: a rerun
finds the last complete checkpoint there and continues. Only when the workers are done are the
results linked into `ctx.output`. Everything a user can get wrong about the input (missing or
empty shards, too few row groups for the world size, a batch that does not divide) is reported
here, before a single worker starts.

Past one machine (`nnodes > 1`), the stage runs node 0's torchrun agent and prints the command
each other node runs (`worker_command(..., node_rank)`): the same trainer JSON, read from a
filesystem every node shares, and torchrun's c10d rendezvous at `rdzv_endpoint`.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.formats import ModelSpec, PretrainArtifacts, ShardManifest
from storage.lineage import empty_input_message
from storage.stage import StageContext, StageError, StageResult
from tasks.models.files import CONFIG_FILE
from tasks.pretrain.config import BERT_SPECIALS, PretrainConfig, TrainerSpec
from tasks.pretrain.data import MANIFEST, read_manifest, shard_paths, split_row_groups
from tasks.pretrain.objectives import KERNELS_FILE, SAMPLES_FILE
from tasks.training import checkpoint
from tasks.training.launch import exclusive, launch, torchrun_args
from tasks.training.launch import worker_command as torchrun_command
from tasks.training.loop import CHECKPOINTS_DIR, DONE_FILE, MODEL_DIR, link_or_copy
from tasks.training.reporting import METRICS_FILE, note

RUN_DIR, SPEC_FILE = "run", "trainer.json"
WORKER_MODULE = "tasks.pretrain.worker"
STAT_KEYS = {"steps": "steps", "tokens_trained": "tokens_trained", "final_train_loss": "final_train_loss",
             "final_val_loss": "final_val_loss", "final_val_ppl": "final_val_ppl", "params": "params",
             "tokens_per_s": "tokens_per_s", "mfu": "mfu", "train_wall_s": "wall_s_train",
             "resumed_from_step": "resumed_from_step", "data_wait_share": "data_wait_share",
             "skipped_nonfinite_steps": "skipped_nonfinite_steps", "micro_batch": "micro_batch",
             "grad_accum": "grad_accum", "world_size": "world_size", "epochs": "epochs",
             "data_consumed": "train_tokens_read"}
TOKEN_TYPES = {"uint16": pa.list_(pa.uint16()), "uint32": pa.list_(pa.uint32())}


def run(config: PretrainConfig, ctx: StageContext) -> StageResult:
    """Pretrains on `ctx.inputs['shard']`; writes model/, checkpoints/, metrics.jsonl (+ samples.txt)."""
    spec = trainer_spec(config, ctx)
    run_dir = Path(spec.loop.run_dir)
    with exclusive(ctx.scratch, "pretrain"):
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path = run_dir / SPEC_FILE
        spec_path.write_text(spec.model_dump_json(indent=2) + "\n")
        if not (run_dir / DONE_FILE).exists():
            for node in range(1, config.nnodes):
                note(f"start node {node} with: {' '.join(worker_command(config, spec_path, node))}", "pretrain")
            launch(worker_command(config, spec_path), run_dir)
        return collect(run_dir, ctx.output)


# ---- checking the input and planning the batch ---------------------------------------------


def trainer_spec(config: PretrainConfig, ctx: StageContext) -> TrainerSpec:
    """Validates the shards against the config and returns what the workers are handed."""
    if "shard" not in ctx.inputs:
        raise StageError("pretrain needs the shard stage's output: ctx.inputs has no 'shard' entry")
    shard_dir = Path(ctx.inputs["shard"])
    manifest = check_shards(shard_dir, config)
    specials = special_ids(manifest, config, shard_dir / MANIFEST)
    model = config.model.resolve(manifest.vocab_size, specials, nsp=config.nsp)
    per_rank, max_steps = plan_batch(config, model.seq_len)
    tokenizer = ctx.inputs.get("tokenizer")
    loop = config.loop_config(str(ctx.scratch / RUN_DIR), ctx.seed, per_rank, max_steps,
                              ctx.mlflow_tracking_uri, ctx.mlflow_run_id)
    return TrainerSpec(loop=loop, model=model, shard_dir=str(shard_dir), mlm_probability=config.mlm_probability,
                       sample=config.sample, tokenizer_dir=str(tokenizer) if tokenizer else None,
                       kernels=config.model.kernels)


def check_shards(shard_dir: Path, config: PretrainConfig) -> ShardManifest:
    """The manifest, once every shard it lists is readable, typed right, and the splits can feed every rank."""
    path = shard_dir / MANIFEST
    manifest = read_manifest(shard_dir)            # a FileFormatError (a StageError) names the file and field
    if not manifest.shards:
        raise StageError(f"pretrain has nothing to train on: {empty_input_message(shard_dir, 'tokens')}")
    files = shard_paths(shard_dir, manifest)
    rows = sum(_check_shard_file(f, manifest.token_dtype) for f in files)
    if rows == 0 or manifest.tokens_train == 0:
        raise StageError(f"pretrain has nothing to train on ({path}: {rows} rows, no training tokens): "
                         f"{empty_input_message(shard_dir, 'tokens')}")
    _check_row_groups(files, config, path)
    return manifest


def _check_shard_file(path: Path, token_dtype: str) -> int:
    """Row count of one shard, after checking it exists and has the columns and types we read."""
    if not path.is_file():
        raise StageError(f"{path}: listed in the manifest but missing")
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise StageError(f"{path}: not a readable Parquet file ({exc})") from None
    schema = parquet.schema_arrow
    for column in ("doc_id", "split", "tokens"):
        if column not in schema.names:
            raise StageError(f"{path}: column '{column}' is missing (has {', '.join(schema.names)})")
    if schema.field("tokens").type != TOKEN_TYPES[token_dtype]:
        raise StageError(f"{path}: column 'tokens' is {schema.field('tokens').type}, but the manifest's "
                         f"token_dtype is {token_dtype}")
    return parquet.metadata.num_rows


def _check_row_groups(files: list[Path], config: PretrainConfig, manifest_path: Path) -> None:
    train = split_row_groups(files, "train")
    if len(train) < config.world_size:
        raise StageError(f"{manifest_path}: {len(train)} row groups hold training rows but world size is "
                         f"{config.world_size} (nproc_per_node x nnodes); each rank needs its own row groups")
    if config.eval_every and not split_row_groups(files, "val"):
        raise StageError(f"{manifest_path}: eval_every={config.eval_every} but the shards hold no 'val' rows; "
                         "raise the shard stage's val_fraction or set eval_every: 0")


def special_ids(manifest: ShardManifest, config: PretrainConfig, path: Path) -> dict[str, int]:
    """The special token ids the architecture needs: EOT for GPT, the five BERT tokens for BERT."""
    specials, vocab = manifest.special_tokens, manifest.vocab_size
    if config.model.resolved_arch() == "gpt":
        eot = manifest.eot_id
        if not isinstance(eot, int) or not 0 <= eot < vocab:
            raise StageError(f"{path}: field 'eot_id' is {eot!r}; GPT packing needs an <|endoftext|> id below "
                             f"vocab_size {vocab}")
        return {"<|endoftext|>": eot}
    missing = [name for name in BERT_SPECIALS if not isinstance(specials.get(name), int)]
    if missing:
        raise StageError(f"{path}: special_tokens lacks {', '.join(missing)}; BERT needs {' '.join(BERT_SPECIALS)} "
                         "(add them to the tokenizer stage's special tokens)")
    out_of_range = [name for name in BERT_SPECIALS if specials[name] >= vocab]
    if out_of_range:
        raise StageError(f"{path}: special_tokens {out_of_range} are not below vocab_size {vocab}")
    return {name: specials[name] for name in BERT_SPECIALS}


def plan_batch(config: PretrainConfig, seq_len: int) -> tuple[int, int]:
    """(sequences per rank per step, optimizer steps) from batch_tokens and the step or token budget."""
    unit = seq_len * config.world_size
    per_rank, remainder = divmod(config.batch_tokens, unit)
    if remainder or per_rank == 0:
        suggestion = max(1, round(config.batch_tokens / unit)) * unit
        raise StageError(f"batch_tokens={config.batch_tokens} must be a multiple of seq_len x world size = "
                         f"{seq_len} x {config.world_size} = {unit}; e.g. batch_tokens={suggestion}")
    if config.micro_batch and per_rank % config.micro_batch:
        divisors = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
        raise StageError(f"micro_batch={config.micro_batch} does not divide the {per_rank} sequences each rank "
                         f"processes per step; choose one of {divisors}")
    if config.micro_batch is None and config.dist == "fsdp":
        raise StageError("micro_batch=null (probe the largest that fits) needs dist='ddp'; set micro_batch for fsdp")
    steps = config.max_steps or math.ceil(config.max_tokens / (per_rank * unit))
    if config.optim.warmup_steps > steps:
        raise StageError(f"optim.warmup_steps={config.optim.warmup_steps} exceeds the run's {steps} steps")
    return per_rank, steps


# ---- launching torchrun ---------------------------------------------------------------------


def worker_command(config: PretrainConfig, spec_path: Path, node_rank: int = 0) -> list[str]:
    """The command one node runs: torchrun (dying with its parent) on the pretrain worker."""
    torchrun = torchrun_args(config.nnodes, config.nproc_per_node, config.rdzv_endpoint, node_rank,
                             run_id="lmforge-pretrain")
    return torchrun_command(WORKER_MODULE, spec_path, torchrun)


# ---- collecting the results -----------------------------------------------------------------


def collect(run_dir: Path, output: Path) -> StageResult:
    """Links the finished run's model, kept checkpoints, metrics and samples into `output`."""
    done = json.loads((run_dir / DONE_FILE).read_text())
    _link_tree(run_dir / MODEL_DIR, output / MODEL_DIR)
    if (run_dir / KERNELS_FILE).exists():                 # beside config.json, not in it: not part of the model
        shutil.copy2(run_dir / KERNELS_FILE, output / MODEL_DIR / KERNELS_FILE)
    for kept in checkpoint.complete_checkpoints(run_dir / CHECKPOINTS_DIR):
        _link_tree(kept, output / CHECKPOINTS_DIR / kept.name)
    for name in (METRICS_FILE, SAMPLES_FILE):
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, output / name)
    stats = {out: float(done[key]) for key, out in STAT_KEYS.items() if key in done}
    model = ModelSpec.read(output / MODEL_DIR / CONFIG_FILE)
    artifacts = PretrainArtifacts(final_checkpoint=done["final_checkpoint"], model=model)
    return StageResult(stats=stats, artifacts=artifacts.model_dump(mode="json"))


def _link_tree(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            link_or_copy(path, target / path.name)
