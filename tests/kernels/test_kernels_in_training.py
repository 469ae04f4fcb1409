"""Pretraining with `model.kernels` on, through the real pretrain code path, under Triton's interpreter.

The same nano runs with the kernels off and on give the same loss curve within float tolerance; the
recipe's `model.kernels` stays out of the fingerprint and out of `config.json`, and the output
records which kernels ran in `model/kernels.json`, beside it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks" / "pretrain"))
import shardfixture as sf  # noqa: E402

from kernels import LAUNCHES  # noqa: E402
from tasks.pretrain import PretrainConfig, run  # noqa: E402
from tasks.pretrain.objectives import KERNELS_FILE, make_objective  # noqa: E402
from tasks.pretrain.stage import trainer_spec  # noqa: E402
from tasks.training.loop import Trainer  # noqa: E402
from tasks.training.runtime import DistEnv  # noqa: E402

ENV = DistEnv(rank=0, local_rank=0, world=1, device=torch.device("cpu"))
ON = {"fused_ce": True, "fused_norm": True}
SHORT = dict(batch_tokens=4 * 64, micro_batch=2, max_steps=8, eval_every=4, eval_batches=1, checkpoint_every=0,
             optim={"lr": 3e-3, "warmup_steps": 1})


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    return sf.write_shards(tmp_path_factory.mktemp("wikitext"), sf.wikitext_docs(shared_data), n_files=2,
                           row_group_rows=4)


def train(root: Path, shards: Path, **overrides: object) -> tuple[list[dict], Path]:
    """The metrics of an in-process run of the pretrain trainer, and its run directory."""
    config = PretrainConfig.model_validate(sf.nano_config(**{**SHORT, **overrides}))
    spec = trainer_spec(config, sf.stage_context(root, shards))
    run_dir = Path(spec.loop.run_dir)
    run_dir.mkdir(parents=True)
    Trainer(spec.loop, make_objective(spec), ENV).fit()
    return sf.read_metrics(run_dir / "metrics.jsonl"), run_dir


def assert_same_curve(plain: list[dict], fused: list[dict]) -> None:
    assert [m["step"] for m in fused] == [m["step"] for m in plain]
    for a, b in zip(plain, fused):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), a["step"]
        assert ("val_loss" in a) == ("val_loss" in b)
        if "val_loss" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4), a["step"]


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_nano_pretraining_gives_the_same_loss_curve_with_the_kernels(arch: str, tmp_path: Path,
                                                                     shards: Path) -> None:
    model = {"preset": f"{arch}-nano"}
    plain, plain_dir = train(tmp_path / "plain", shards, model=model)
    before = (LAUNCHES["cross_entropy_rows"], LAUNCHES["layer_norm_forward"], LAUNCHES["layer_norm_backward"])
    fused, fused_dir = train(tmp_path / "fused", shards, model={**model, "kernels": ON})
    after = (LAUNCHES["cross_entropy_rows"], LAUNCHES["layer_norm_forward"], LAUNCHES["layer_norm_backward"])
    assert all(a > b for a, b in zip(after, before))                 # the Triton code ran, every kernel
    assert_same_curve(plain, fused)
    assert plain[-1]["loss"] < plain[0]["loss"] - 0.3                  # it trains: the comparison means something
    assert not (plain_dir / KERNELS_FILE).exists()
    assert json.loads((fused_dir / KERNELS_FILE).read_text()) == {**ON, "backend": "triton-interpreter",
                                                                  "triton": sf_triton_version()}


def test_without_the_interpreter_a_cpu_run_falls_back_to_pytorch(tmp_path: Path, shards: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capfd: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    before = sum(LAUNCHES.values())
    _, run_dir = train(tmp_path, shards, max_steps=2, eval_every=0, model={"preset": "gpt-nano", "kernels": ON})
    assert sum(LAUNCHES.values()) == before
    assert json.loads((run_dir / KERNELS_FILE).read_text())["backend"] == "torch"
    assert "model.kernels: Triton kernels need a CUDA device (this is cpu), or TRITON_INTERPRET=1; the PyTorch " \
           "fallback runs" in capfd.readouterr().err


def test_kernels_stay_out_of_the_fingerprint_and_the_model_config() -> None:
    plain = PretrainConfig.model_validate(sf.nano_config())
    fused = PretrainConfig.model_validate(sf.nano_config(model={"preset": "gpt-nano", "kernels": ON}))
    assert fused.model.kernels.fused_ce and not plain.model.kernels.enabled()
    assert fused.output_fields() == plain.output_fields()
    assert "kernels" not in fused.model.resolve(262, {"<|endoftext|>": 256}).model_dump()
    with pytest.raises(ValueError, match="fused_attention"):
        PretrainConfig.model_validate(sf.nano_config(model={"kernels": {"fused_attention": True}}))


def test_the_stage_writes_kernels_json_beside_config_json(tmp_path: Path, shards: Path) -> None:
    """The real stage: torchrun starts the worker (TRITON_INTERPRET reaches it through the environment)."""
    config = PretrainConfig.model_validate(sf.nano_config(**{**SHORT, "max_steps": 2, "eval_every": 0},
                                                          model={"preset": "gpt-nano", "kernels": ON}))
    result = run(config, sf.stage_context(tmp_path, shards))
    model_dir = tmp_path / "output" / "model"
    assert json.loads((model_dir / KERNELS_FILE).read_text())["backend"] == "triton-interpreter"
    assert "kernels" not in json.loads((model_dir / "config.json").read_text())
    assert result.stats["steps"] == 2


def sf_triton_version() -> str:
    from importlib.metadata import version

    return version("triton")
