"""The training loop in one process (world size 1, no torchrun): accumulation, NaN skipping, samples."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import shardfixture as sf
import torch

from tasks.pretrain.config import PretrainConfig
from tasks.pretrain.objectives import make_objective
from tasks.pretrain.stage import trainer_spec
from tasks.training import loop
from tasks.training.loop import DONE_FILE, Trainer
from tasks.training.reporting import MetricsLog
from tasks.training.runtime import DistEnv

ENV = DistEnv(rank=0, local_rank=0, world=1, device=torch.device("cpu"))


@pytest.fixture(autouse=True)
def one_thread():
    """Nano models run fastest on one thread, and two OpenMP threads crawl when the other core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    docs = sf.wikitext_docs(shared_data)
    return sf.write_shards(tmp_path_factory.mktemp("wikitext"), docs, n_files=2, row_group_rows=4)


def train(root: Path, shards: Path, tokenizer: Path | None = None, **overrides: object) -> tuple[Trainer, list[dict]]:
    config = PretrainConfig.model_validate(sf.nano_config(**overrides))
    spec = trainer_spec(config, sf.stage_context(root, shards, tokenizer))
    Path(spec.loop.run_dir).mkdir(parents=True)
    trainer = Trainer(spec.loop, make_objective(spec), ENV)
    trainer.fit()
    return trainer, sf.read_metrics(Path(spec.loop.run_dir) / "metrics.jsonl")


def test_gradient_accumulation_matches_one_big_micro_batch(tmp_path: Path, shards: Path) -> None:
    settings = dict(batch_tokens=8 * 64, max_steps=8, eval_every=0, checkpoint_every=0)
    whole, one = train(tmp_path / "whole", shards, micro_batch=8, **settings)
    split, four = train(tmp_path / "split", shards, micro_batch=2, **settings)
    assert (whole.accum, split.accum) == (1, 4)
    for a, b in zip(one, four):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert one[-1]["loss"] < one[0]["loss"] - 0.5               # real text: the loss falls
    assert one[-1]["tokens"] == 8 * 8 * 64


def test_nonfinite_batches_are_skipped_when_asked(tmp_path: Path, shards: Path) -> None:
    trainer, metrics = train(tmp_path, shards, optim={"lr": 1e30, "warmup_steps": 0}, on_nonfinite="skip",
                             max_steps=3, eval_every=0)
    done = json.loads((tmp_path / "scratch" / "run" / DONE_FILE).read_text())
    assert [m["skipped"] for m in metrics] == [False, True, True]     # step 1 blows the weights up
    assert done["skipped_nonfinite_steps"] == 2


def test_cpu_picks_the_largest_micro_batch_that_divides_the_batch(tmp_path: Path, shards: Path) -> None:
    trainer, _ = train(tmp_path, shards, micro_batch=None, batch_tokens=48 * 64, max_steps=3, eval_every=0)
    assert (trainer.micro_batch, trainer.accum) == (16, 3)


def test_finished_run_writes_model_samples_and_summary(tmp_path: Path, shards: Path) -> None:
    tokenizer = sf.write_tokenizer(tmp_path / "tokenizer")
    _, metrics = train(tmp_path, shards, tokenizer, max_steps=10, sample={"prompts": ["<|endoftext|> The "],
                                                                         "max_new_tokens": 24})
    run_dir = tmp_path / "scratch" / "run"
    samples = (run_dir / "samples.txt").read_text()
    assert "### sample 1, prompt '<|endoftext|> The '" in samples
    assert "<|endoftext|> The " in samples                     # the special-token text stayed plain text
    assert len(samples.splitlines()[1]) > len("<|endoftext|> The ")
    done = json.loads((run_dir / DONE_FILE).read_text())
    assert done["steps"] == 10 and done["final_checkpoint"] == "step-10" and done["params"] == 120960
    assert 0 < done["final_val_loss"] < 6 and done["final_val_ppl"] > 1
    assert {"val_loss", "val_ppl"} <= metrics[-1].keys() and metrics[-1]["step"] == 10
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert config["arch"] == "gpt" and config["vocab_size"] == sf.VOCAB_SIZE


def test_an_mlflow_failure_does_not_stop_training_metrics(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    log = MetricsLog(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", "no-such-run")
    log.log(1, {"loss": 5.5, "lr": 1e-3})
    assert sf.read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 5.5, "lr": 1e-3}]
    assert "step 1: could not log to MLflow" in capfd.readouterr().err


def test_an_unknown_accelerator_reports_no_mfu_and_warns_once(tmp_path: Path, shards: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capfd: pytest.CaptureFixture) -> None:
    # No GPU here: stand in for one the peak table does not know (what `peak_flops` returns for it).
    monkeypatch.setattr(loop, "peak_flops", lambda device, precision, configured: None)
    monkeypatch.setattr(loop, "device_name", lambda device: "NVIDIA B300")
    _, metrics = train(tmp_path, shards, max_steps=4, eval_every=0)
    warnings = [line for line in capfd.readouterr().err.splitlines() if "unknown accelerator" in line]
    assert warnings == ["pretrain: unknown accelerator 'NVIDIA B300': MFU is not reported; set pretrain.peak_flops "
                        "to one device's dense fp32 peak FLOP/s"]
    assert all("mfu" not in m for m in metrics) and all(m["tokens_per_s"] > 0 for m in metrics)
    assert "mfu" not in json.loads((tmp_path / "scratch" / "run" / DONE_FILE).read_text())
