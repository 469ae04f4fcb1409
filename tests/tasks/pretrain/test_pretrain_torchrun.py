"""The stage end to end under real torchrun launches (gloo, 2 CPU processes) on real text.

One gpt-nano run is the reference the others compare against: a simulated two-node launch, and a
run killed with SIGKILL after its first checkpoint and then rerun.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import shardfixture as sf
from cliutil import free_port

from storage.stage import StageError
from storage.workspace import file_entries, output_digest
from tasks.pretrain import STAGE, PretrainConfig, run
from tasks.pretrain.data import rank_row_groups, read_manifest, shard_paths, split_row_groups
from tasks.pretrain.stage import trainer_spec, worker_command

GPT_RUN = sf.nano_config(nproc_per_node=2, max_steps=40, checkpoint_every=10, keep_last=2, eval_every=20,
                         sample={"max_new_tokens": 16})
STAGE_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import shardfixture as sf
from tasks.pretrain import PretrainConfig, run
root, shards = Path(sys.argv[2]), Path(sys.argv[3])
run(PretrainConfig.model_validate(json.loads(sys.argv[4])), sf.stage_context(root, shards))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("corpus")
    shards = sf.write_shards(root / "shard", sf.shakespeare_docs(shared_data, 1500), n_files=2, row_group_rows=64)
    return shards, sf.write_tokenizer(root / "tokenizer")


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A real sqlite MLflow store with one run, standing in for the stage's nested run."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("pretrain-test", artifact_location=(root / "artifacts").as_uri())
    return uri, client.create_run(experiment).info.run_id


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus: tuple[Path, Path], mlflow_run: tuple[str, str]):
    """The uninterrupted gpt-nano run on two processes: (context, stage result)."""
    shards, tokenizer = corpus
    ctx = sf.stage_context(tmp_path_factory.mktemp("reference"), shards, tokenizer,
                           mlflow_tracking_uri=mlflow_run[0], mlflow_run_id=mlflow_run[1])
    return ctx, run(PretrainConfig.model_validate(GPT_RUN), ctx)


def losses(path: Path) -> list[float]:
    return [m["loss"] for m in sf.read_metrics(path)]


def test_gpt_nano_on_two_processes_learns_and_writes_its_outputs(reference) -> None:
    ctx, result = reference
    out = ctx.output
    metrics = sf.read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 41))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= metrics[0].keys()
    assert metrics[0]["loss"] > 5.0 and max(m["loss"] for m in metrics[-5:]) < metrics[0]["loss"] - 1.5
    evaluated = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in evaluated] == [20, 40] and evaluated[1]["val_ppl"] < evaluated[0]["val_ppl"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-30", "step-40"]   # keep_last=2
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "samples.txt").read_text().count("### sample") == 3
    stats = result.stats
    assert stats["steps"] == 40 and stats["tokens_trained"] == 40 * 2048 and stats["world_size"] == 2
    assert stats["final_train_loss"] == metrics[-1]["loss"] and stats["final_val_loss"] == evaluated[1]["val_loss"]
    assert stats["params"] == 120960 and stats["resumed_from_step"] == 0 and stats["grad_accum"] == 2
    assert stats["tokens_per_s"] > 0 and 0 < stats["mfu"] < 1 and stats["wall_s_train"] > 0
    assert result.artifacts["model"]["arch"] == "gpt"


def test_metrics_and_artifacts_reach_the_mlflow_run(reference, mlflow_run: tuple[str, str]) -> None:
    from mlflow.tracking import MlflowClient

    ctx, _ = reference
    client = MlflowClient(mlflow_run[0])
    history = client.get_metric_history(mlflow_run[1], "loss")
    assert sorted(m.step for m in history) == list(range(1, 41))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == losses(ctx.output / "metrics.jsonl")
    assert sorted(m.step for m in client.get_metric_history(mlflow_run[1], "val_ppl")) == [20, 40]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "val_loss"} <= client.get_run(mlflow_run[1]).data.metrics.keys()
    artifacts = {a.path for a in client.list_artifacts(mlflow_run[1])}
    assert {"model", "samples.txt"} <= artifacts
    assert {a.path for a in client.list_artifacts(mlflow_run[1], "model")} == {"model/config.json",
                                                                               "model/model.safetensors"}


def test_epochs_count_the_training_tokens_both_ranks_read(reference, corpus: tuple[Path, Path],
                                                          mlflow_run: tuple[str, str]) -> None:
    from mlflow.tracking import MlflowClient

    ctx, result = reference
    stats, available = result.stats, read_manifest(corpus[0]).tokens_train
    assert stats["epochs"] == stats["train_tokens_read"] / available
    # a window of seq_len + 1 stream tokens trains seq_len positions; some stream tokens are separators
    assert 0.9 * stats["tokens_trained"] < stats["train_tokens_read"] < stats["tokens_trained"] * 65 / 64
    epochs = [m["epochs"] for m in sf.read_metrics(ctx.output / "metrics.jsonl")]
    assert epochs[-1] == stats["epochs"]
    history = sorted(MlflowClient(mlflow_run[0]).get_metric_history(mlflow_run[1], "epochs"), key=lambda m: m.step)
    assert [m.value for m in history] == epochs


def test_two_node_launch_agrees_with_the_one_node_run(tmp_path: Path, corpus: tuple[Path, Path], reference) -> None:
    config = PretrainConfig.model_validate({**GPT_RUN, "nproc_per_node": 1, "nnodes": 2,
                                            "rdzv_endpoint": f"127.0.0.1:{free_port()}"})
    spec = trainer_spec(config, sf.stage_context(tmp_path, corpus[0]))
    run_dir = Path(spec.loop.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "trainer.json").write_text(spec.model_dump_json())
    # Both "nodes" share this machine's two cores: one thread each, as torchrun gives 2 local workers.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(worker_command(config, run_dir / "trainer.json", node), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for node in (0, 1)]
    outputs = [agent.communicate(timeout=300)[0].decode(errors="replace") for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    two_nodes = losses(run_dir / "metrics.jsonl")
    assert two_nodes == pytest.approx(losses(reference[0].output / "metrics.jsonl"), rel=1e-6)
    assert json.loads((run_dir / "done.json").read_text())["world_size"] == 2


def trainer_processes(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def test_sigkill_after_a_checkpoint_then_rerun_continues_exactly(tmp_path: Path, corpus: tuple[Path, Path],
                                                                 reference) -> None:
    shards = corpus[0]
    stage = subprocess.Popen([sys.executable, "-c", STAGE_SCRIPT, str(Path(sf.__file__).parent), str(tmp_path),
                              str(shards), json.dumps(GPT_RUN)], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "scratch" / "run"
    first = run_dir / "checkpoints" / "step-10" / "checkpoint.json"
    deadline = time.monotonic() + 240
    while not first.exists() and stage.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(stage.pid, signal.SIGKILL)                  # the stage and its torchrun agent, at once
    stage.wait()
    assert first.exists() and not (run_dir / "done.json").exists()
    deadline = time.monotonic() + 20                      # the workers follow their dead agent
    while trainer_processes(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not trainer_processes(str(run_dir))
    # Leftovers a crash can leave: a checkpoint being written, and one copied in half.
    (run_dir / "checkpoints" / "step-50.tmp").mkdir()
    (run_dir / "checkpoints" / "step-60").mkdir()
    (run_dir / "checkpoints" / "step-60" / "model.safetensors").write_bytes(b"partial")

    # with the tokenizer, as the reference had it, for the same samples.txt
    result = run(PretrainConfig.model_validate(GPT_RUN), sf.stage_context(tmp_path, shards, corpus[1]))
    assert result.stats["resumed_from_step"] in (10, 20, 30)
    assert losses(tmp_path / "output" / "metrics.jsonl") == losses(reference[0].output / "metrics.jsonl")
    assert result.stats["final_val_loss"] == reference[1].stats["final_val_loss"]
    assert result.stats["epochs"] == reference[1].stats["epochs"]          # counted from the checkpoint on
    weights = "model/model.safetensors"
    assert (tmp_path / "output" / weights).read_bytes() == (reference[0].output / weights).read_bytes()
    # Only timings differ, in the files pretrain leaves out of its output digest: a later stage stays fresh.
    rerun, uninterrupted = file_entries(tmp_path / "output"), file_entries(reference[0].output)
    assert output_digest(rerun, STAGE.digest_ignores) == output_digest(uninterrupted, STAGE.digest_ignores)
    assert output_digest(rerun) != output_digest(uninterrupted)


def test_fsdp_matches_ddp_and_writes_full_weights(tmp_path: Path, corpus: tuple[Path, Path], reference) -> None:
    result = run(PretrainConfig.model_validate({**GPT_RUN, "dist": "fsdp"}), sf.stage_context(tmp_path, *corpus))
    sharded = losses(tmp_path / "output" / "metrics.jsonl")
    assert (tmp_path / "output" / "samples.txt").read_text().count("### sample") == 3   # KV-cached, sharded
    assert sharded == pytest.approx(losses(reference[0].output / "metrics.jsonl"), rel=1e-5)
    weights = (tmp_path / "output" / "model" / "model.safetensors").stat().st_size
    assert weights == (reference[0].output / "model" / "model.safetensors").stat().st_size   # gathered, not a shard
    assert result.stats["final_val_loss"] == pytest.approx(reference[1].stats["final_val_loss"], rel=1e-5)


def test_bert_nano_on_two_processes_learns(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    config = sf.nano_config(model={"preset": "bert-nano"}, nproc_per_node=2, max_steps=30, eval_every=15,
                            checkpoint_every=0, optim={"lr": 3e-3})
    result = run(PretrainConfig.model_validate(config), sf.stage_context(tmp_path, *corpus))
    metrics = sf.read_metrics(tmp_path / "output" / "metrics.jsonl")
    assert metrics[0]["loss"] > 5.0 and max(m["loss"] for m in metrics[-5:]) < metrics[0]["loss"] - 1.5
    assert result.stats["final_val_loss"] < metrics[0]["loss"] - 1.5
    assert result.artifacts["model"]["arch"] == "bert" and result.artifacts["model"]["nsp"] is True
    assert not (tmp_path / "output" / "samples.txt").exists()          # samples are a GPT thing
    assert [p.name for p in (tmp_path / "output" / "checkpoints").iterdir()] == ["step-30"]


def test_a_crashing_worker_fails_the_stage_with_its_traceback(tmp_path: Path, shared_data: Path) -> None:
    docs = sf.shakespeare_docs(shared_data, 400)
    clean = sf.write_shards(tmp_path / "clean", docs, row_group_rows=32)
    groups = split_row_groups(shard_paths(clean, read_manifest(clean)), "train")
    first_of_rank1 = groups[rank_row_groups(len(groups), 0, 0, rank=1, world=2)[0]]
    doc_ids = pq.ParquetFile(first_of_rank1.path).read_row_group(first_of_rank1.index, columns=["doc_id"])
    shards = sf.write_shards(tmp_path / "poisoned", docs, row_group_rows=32, poison=set(doc_ids["doc_id"].to_pylist()))
    started = time.monotonic()
    with pytest.raises(StageError) as failure:
        run(PretrainConfig.model_validate(sf.nano_config(nproc_per_node=2)), sf.stage_context(tmp_path, shards))
    message = str(failure.value)
    assert message.startswith("pretrain worker rank 1 failed: ShardDataError: ")
    assert f"{Path(first_of_rank1.path).name} row group {first_of_rank1.index}: document " in message
    assert "Traceback (most recent call last)" in message and "read_documents" in message
    assert time.monotonic() - started < 120                           # rank 0 was stopped, not left hanging


def test_nan_loss_stops_the_run_naming_the_step(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    config = sf.nano_config(optim={"lr": 1e30, "warmup_steps": 0}, eval_every=0, max_steps=10)
    with pytest.raises(StageError, match=r"NonFiniteLossError: non-finite training loss nan .* at step 2; "
                                         r"lower optim.lr, or set on_nonfinite='skip'"):
        run(PretrainConfig.model_validate(config), sf.stage_context(tmp_path, corpus[0]))
    assert [m["step"] for m in sf.read_metrics(tmp_path / "scratch" / "run" / "metrics.jsonl")] == [1]
