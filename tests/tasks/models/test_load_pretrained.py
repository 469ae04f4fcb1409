"""load_pretrained: weights and config from a finished model only, checked against its tokenizer."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from nanospecs import BERT_IDS, GPT_IDS, spec_for

from storage.formats import TokenizerFile
from storage.stage import StageError
from storage.workspace import Workspace
from tasks.models import Encoder, PretrainedModelError, build_model, load_pretrained
from tasks.training import checkpoint
from tasks.training.config import OptimConfig
from tasks.training.loop import export_model
from tasks.training.optim import build_optimizer
from tasks.training.runtime import DistEnv

ENV = DistEnv(rank=0, local_rank=0, world=1, device=torch.device("cpu"))


def pretrain_output(root: Path, arch: str) -> tuple[Path, torch.nn.Module]:
    """A committed pretrain-like output (checkpoints/step-2, model/, _SUCCESS.json) of a model trained 2 steps."""
    torch.manual_seed(0)
    spec = spec_for(arch)
    model = build_model(spec)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2), ENV.device)
    for _ in range(2):
        ids = torch.randint(0, 256, (2, 16))
        loss = model(ids, ids).loss if arch == "gpt" else model(ids, torch.zeros_like(ids), ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    workspace = Workspace(root)
    tmp = workspace.new_temp_dir("pretrain", "fp")
    step = checkpoint.save(tmp / "checkpoints", 2, model, optimizer, spec, {"summary": {}},
                           {"loader": {"epoch": 0}}, ENV)
    export_model(step, tmp / "model")
    return workspace.commit("pretrain", "fp", tmp, {}), model


@pytest.fixture(scope="module", params=["gpt", "bert"])
def trained(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    return pretrain_output(tmp_path_factory.mktemp(request.param), request.param)


def tokenizer(root: Path, specials: dict[str, int], vocab_size: int = 262) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    TokenizerFile(pattern=r"[\s\S]", special_tokens=specials, vocab_size=vocab_size,
                  n_ranks=256).write(root / "tokenizer_config.json")
    return root


def test_weights_and_config_load_from_every_kind_of_model_directory(trained) -> None:
    output, original = trained
    for directory in (output, output / "model", output / "checkpoints" / "step-2"):
        model, spec = load_pretrained(directory, "cpu")
        assert spec == original.spec and not model.training and isinstance(model, Encoder)
        loaded, expected = model.state_dict(), original.state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[name], expected[name]) for name in expected), directory
    ids = torch.randint(0, 256, (1, 8))
    assert torch.equal(model.hidden_states(ids), original.eval().hidden_states(ids))


def damaged(output: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Directories that must be refused, and a pattern the message must contain."""
    step = output / "checkpoints" / "step-2"
    cases = {}
    cases["unfinished tmp"] = (shutil.copytree(step, tmp_path / "step-3.tmp"), "unfinished write")
    truncated = shutil.copytree(step, tmp_path / "step-4")
    with (truncated / "model.safetensors").open("r+b") as handle:
        handle.truncate(1000)
    cases["truncated weights"] = (truncated, r"model.safetensors has 1000 bytes; checkpoint.json lists \d+")
    unindexed = shutil.copytree(step, tmp_path / "step-5")
    (unindexed / "checkpoint.json").unlink()
    cases["no index"] = (unindexed, "checkpoint.json is missing")
    lost = shutil.copytree(step, tmp_path / "step-6")
    (lost / "trainer_state.pt").unlink()
    cases["listed file gone"] = (lost, "trainer_state.pt is listed in checkpoint.json but missing")
    no_config = shutil.copytree(output / "model", tmp_path / "no-config" / "model")
    (no_config / "config.json").unlink()
    cases["no config"] = (no_config, "config.json missing")
    cut = shutil.copytree(output / "model", tmp_path / "cut" / "model")
    cut.joinpath("model.safetensors").write_bytes(cut.joinpath("model.safetensors").read_bytes()[:-8])
    cases["cut weights, no index"] = (cut, "its header describes")
    committed = shutil.copytree(output, tmp_path / "committed")
    with (committed / "model" / "model.safetensors").open("ab") as handle:
        handle.write(b"\0" * 8)
    cases["differs from _SUCCESS.json"] = (committed, r"_SUCCESS.json lists \d+")
    cases["empty"] = ((tmp_path / "empty").resolve(), "holds neither model.safetensors")
    (tmp_path / "empty").mkdir()
    return cases


def test_incomplete_directories_are_refused_naming_the_path(trained, tmp_path: Path) -> None:
    output, _ = trained
    for case, (directory, pattern) in damaged(output, tmp_path).items():
        with pytest.raises(PretrainedModelError, match=pattern) as refused:
            load_pretrained(directory)
        assert str(directory) in str(refused.value), case
        assert isinstance(refused.value, StageError)            # a CLI prints it as one line


def test_the_tokenizer_must_match_the_models_vocabulary_and_special_tokens(trained, tmp_path: Path) -> None:
    output, original = trained
    specials = dict(original.spec.special_tokens)
    load_pretrained(output, tokenizer_dir=tokenizer(tmp_path / "same", {**GPT_IDS, **BERT_IDS}))
    config = output / "model" / "config.json"
    bigger = tokenizer(tmp_path / "bigger", specials, vocab_size=300)
    with pytest.raises(PretrainedModelError, match="vocab_size 300, the model .* has 262") as refused:
        load_pretrained(output, tokenizer_dir=bigger)
    assert str(bigger / "tokenizer_config.json") in str(refused.value) and str(config) in str(refused.value)
    name = next(iter(specials))
    moved = tokenizer(tmp_path / "moved", {**specials, name: 255})
    expected = rf"{re.escape(name)}: tokenizer 255, model {specials[name]}"
    with pytest.raises(PretrainedModelError, match=expected) as refused:
        load_pretrained(output, tokenizer_dir=moved)
    assert str(moved / "tokenizer_config.json") in str(refused.value) and str(config) in str(refused.value)
    with pytest.raises(PretrainedModelError, match=r"tokenizer: .*tokenizer_config.json: missing"):
        load_pretrained(output, tokenizer_dir=tmp_path / "nowhere")


def test_nothing_but_weights_is_read(trained, tmp_path: Path) -> None:
    """The trainer state beside the weights (optimizer, RNG: a pickle) is never opened by load_pretrained."""
    output, original = trained
    step = shutil.copytree(output / "checkpoints" / "step-2", tmp_path / "step-2")
    state = step / "trainer_state.pt"
    state.write_bytes(b"\x80not a pickle" + b"\0" * (state.stat().st_size - 13))     # same size: still complete
    model, _ = load_pretrained(step)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
