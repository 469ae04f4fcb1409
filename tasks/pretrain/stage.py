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

import contextlib
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.stage import StageContext, StageError, StageResult
from tasks.pretrain import checkpoint
from tasks.pretrain.config import BERT_SPECIALS, PretrainConfig, TrainerSpec
from tasks.pretrain.data import MANIFEST, shard_paths, split_row_groups
from tasks.pretrain.reporting import METRICS_FILE, SAMPLES_FILE, note
from tasks.pretrain.train import CHECKPOINTS_DIR, DONE_FILE, ERRORS_DIR, MODEL_DIR, link_or_copy

RUN_DIR, SPEC_FILE, LOG_FILE, LOCK_FILE = "run", "trainer.json", "torchrun.log", ".lock"
STAT_KEYS = {"steps": "steps", "tokens_trained": "tokens_trained", "final_train_loss": "final_train_loss",
             "final_val_loss": "final_val_loss", "final_val_ppl": "final_val_ppl", "params": "params",
             "tokens_per_s": "tokens_per_s", "mfu": "mfu", "train_wall_s": "wall_s_train",
             "resumed_from_step": "resumed_from_step", "data_wait_share": "data_wait_share",
             "skipped_nonfinite_steps": "skipped_nonfinite_steps", "micro_batch": "micro_batch",
             "grad_accum": "grad_accum", "world_size": "world_size"}
TOKEN_TYPES = {"uint16": pa.list_(pa.uint16()), "uint32": pa.list_(pa.uint32())}


def run(config: PretrainConfig, ctx: StageContext) -> StageResult:
    """Pretrains on `ctx.inputs['shard']`; writes model/, checkpoints/, metrics.jsonl (+ samples.txt)."""
    spec = trainer_spec(config, ctx)
    run_dir = Path(spec.run_dir)
    with scratch_lock(ctx.scratch):
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path = run_dir / SPEC_FILE
        spec_path.write_text(spec.model_dump_json(indent=2) + "\n")
        if not (run_dir / DONE_FILE).exists():
            launch(config, spec_path, run_dir)
        return collect(run_dir, ctx.output)


# ---- checking the input and planning the batch ---------------------------------------------


def trainer_spec(config: PretrainConfig, ctx: StageContext) -> TrainerSpec:
    """Validates the shards against the config and returns what the workers are handed."""
    if "shard" not in ctx.inputs:
        raise StageError("pretrain needs the shard stage's output: ctx.inputs has no 'shard' entry")
    shard_dir = Path(ctx.inputs["shard"])
    manifest = check_shards(shard_dir, config)
    specials = special_ids(manifest, config, shard_dir / MANIFEST)
    model = config.model.resolve(manifest["vocab_size"], specials, nsp=config.nsp)
    per_rank, max_steps = plan_batch(config, model.seq_len)
    tokenizer = ctx.inputs.get("tokenizer")
    return TrainerSpec(config=config, model=model, shard_dir=str(shard_dir), run_dir=str(ctx.scratch / RUN_DIR),
                       seed=ctx.seed, sequences_per_rank=per_rank, max_steps=max_steps,
                       tokenizer_dir=str(tokenizer) if tokenizer else None,
                       mlflow_tracking_uri=ctx.mlflow_tracking_uri, mlflow_run_id=ctx.mlflow_run_id)


def check_shards(shard_dir: Path, config: PretrainConfig) -> dict[str, Any]:
    """The manifest, once every shard it lists is readable, typed right, and the splits can feed every rank."""
    path = shard_dir / MANIFEST
    if not path.is_file():
        raise StageError(f"{path}: missing; pretrain reads the shard stage's output (manifest.json + shards/)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}: not valid JSON ({exc})") from None
    _check_manifest_fields(manifest, path)
    files = shard_paths(shard_dir, manifest)
    rows = sum(_check_shard_file(f, manifest["token_dtype"]) for f in files)
    if rows == 0 or sum(s.get("tokens_train", s.get("tokens", 1)) for s in manifest["shards"]) == 0:
        raise StageError(f"{path}: the shards hold no training tokens ({rows} rows)")
    _check_row_groups(files, config, path)
    return manifest


def _check_manifest_fields(manifest: Any, path: Path) -> None:
    expected = {"vocab_size": int, "token_dtype": str, "shards": list, "special_tokens": dict}
    for key, kind in expected.items():
        if not isinstance(manifest, dict) or not isinstance(manifest.get(key), kind):
            raise StageError(f"{path}: field '{key}' is missing or not a {kind.__name__}")
    if manifest["token_dtype"] not in TOKEN_TYPES:
        raise StageError(f"{path}: field 'token_dtype' is {manifest['token_dtype']!r}; expected uint16 or uint32")
    if not manifest["shards"]:
        raise StageError(f"{path}: field 'shards' is empty: there is nothing to train on")
    for index, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise StageError(f"{path}: shards[{index}] has no 'path'")


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


def special_ids(manifest: dict[str, Any], config: PretrainConfig, path: Path) -> dict[str, int]:
    """The special token ids the architecture needs: EOT for GPT, the five BERT tokens for BERT."""
    specials, vocab = manifest["special_tokens"], manifest["vocab_size"]
    if config.model.resolved_arch() == "gpt":
        eot = manifest.get("eot_id")
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


def torchrun_args(config: PretrainConfig, node_rank: int = 0, run_id: str = "lmforge-pretrain") -> list[str]:
    """torchrun's own flags: a standalone rendezvous on one node, c10d at `rdzv_endpoint` otherwise."""
    args = [f"--nnodes={config.nnodes}", f"--nproc-per-node={config.nproc_per_node}", "--max-restarts=0",
            "--monitor-interval=0.5"]
    if config.rdzv_endpoint is None:
        return [*args, "--standalone"]
    return [*args, "--rdzv-backend=c10d", f"--rdzv-endpoint={config.rdzv_endpoint}", f"--rdzv-id={run_id}",
            f"--node-rank={node_rank}"]


def worker_command(config: PretrainConfig, spec_path: Path, node_rank: int = 0) -> list[str]:
    """The command one node runs: torchrun (dying with its parent) on the training entry point."""
    return [sys.executable, "-m", "tasks.pretrain.runtime", *torchrun_args(config, node_rank),
            "-m", "tasks.pretrain.train", "--config", str(spec_path)]


def launch(config: PretrainConfig, spec_path: Path, run_dir: Path) -> None:
    """Runs this node's torchrun agent to completion; a failure raises StageError with the root traceback."""
    shutil.rmtree(run_dir / ERRORS_DIR, ignore_errors=True)
    for node in range(1, config.nnodes):
        note(f"start node {node} with: {' '.join(worker_command(config, spec_path, node))}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    process = subprocess.Popen(worker_command(config, spec_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=env)
    pump = threading.Thread(target=_pump, args=(process.stdout, run_dir / LOG_FILE), daemon=True)
    pump.start()
    try:
        code = process.wait()
    except BaseException:
        _stop(process)
        raise
    finally:
        pump.join(timeout=10)
    if code != 0:
        raise StageError(failure_message(run_dir, code))


def _pump(stream: IO[bytes], log_path: Path) -> None:
    """Copies torchrun's output to our stderr (progress bar included) and to the run's log file."""
    with log_path.open("ab") as log:
        while chunk := os.read(stream.fileno(), 65536):
            log.write(chunk)
            log.flush()
            sys.stderr.write(chunk.decode("utf-8", errors="replace"))
            sys.stderr.flush()


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (torchrun then stops its workers), SIGKILL if that takes more than 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def failure_message(run_dir: Path, code: int) -> str:
    """The first worker's recorded error with its traceback, else the tail of torchrun's output."""
    entries = [json.loads(p.read_text()) for p in sorted((run_dir / ERRORS_DIR).glob("rank-*.json"))]
    if entries:
        first = min(entries, key=lambda e: e["time"])
        return (f"pretrain worker rank {first['rank']} failed: {first['type']}: {first['message']} "
                f"(torchrun exit code {code})\n{first['traceback']}")
    log = run_dir / LOG_FILE
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log.exists() else ""
    return f"torchrun exited with code {code} and no worker recorded an error; its last output:\n{tail}"


@contextlib.contextmanager
def scratch_lock(scratch: Path) -> Iterator[None]:
    """One live run per fingerprint: a second one fails at once instead of sharing checkpoints."""
    scratch.mkdir(parents=True, exist_ok=True)
    with (scratch / LOCK_FILE).open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageError(f"{scratch}: another pretrain run with this fingerprint is running") from None
        yield


# ---- collecting the results -----------------------------------------------------------------


def collect(run_dir: Path, output: Path) -> StageResult:
    """Links the finished run's model, kept checkpoints, metrics and samples into `output`."""
    done = json.loads((run_dir / DONE_FILE).read_text())
    _link_tree(run_dir / MODEL_DIR, output / MODEL_DIR)
    for kept in checkpoint.complete_checkpoints(run_dir / CHECKPOINTS_DIR):
        _link_tree(kept, output / CHECKPOINTS_DIR / kept.name)
    for name in (METRICS_FILE, SAMPLES_FILE):
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, output / name)
    stats = {out: float(done[key]) for key, out in STAT_KEYS.items() if key in done}
    model_config = json.loads((output / MODEL_DIR / checkpoint.CONFIG_FILE).read_text())
    return StageResult(stats=stats, artifacts={"final_checkpoint": done["final_checkpoint"], "model": model_config})


def _link_tree(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            link_or_copy(path, target / path.name)
