"""Equal token budgets: a run on less data trains the same tokens, repeating epochs, and says how many.

`epochs` = document tokens of the training split the loaders passed over (all ranks) / the split's
document tokens (the shard manifest's `tokens_train`).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import shardfixture as sf
import torch

from tasks.pretrain.config import PretrainConfig
from tasks.pretrain.data import PairIds, PairStream, TokenStream, gpt_batches, read_manifest, shard_paths
from tasks.pretrain.data import split_row_groups
from tasks.pretrain.objectives import make_objective
from tasks.pretrain.stage import trainer_spec
from tasks.training.loop import Trainer
from tasks.training.runtime import DistEnv

ENV = DistEnv(rank=0, local_rank=0, world=1, device=torch.device("cpu"))
IDS = PairIds(sf.SPECIALS["[CLS]"], sf.SPECIALS["[SEP]"], sf.SPECIALS["[PAD]"])
BUDGET = dict(max_steps=None, max_tokens=12 * 1024, batch_tokens=1024, micro_batch=8, eval_every=0,
              checkpoint_every=0)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    """The same text, all of it and a small part of it (the variant whose data shrank)."""
    root = tmp_path_factory.mktemp("corpora")
    docs = sf.shakespeare_docs(shared_data, 600)
    return {"full": sf.write_shards(root / "full", docs, row_group_rows=32),
            "small": sf.write_shards(root / "small", docs[:40], row_group_rows=8)}


def train_groups(shards: Path) -> list:
    return split_row_groups(shard_paths(shards, read_manifest(shards)), "train")


def test_a_gpt_window_of_one_epoch_consumes_every_training_token_once(corpora) -> None:
    shards = corpora["small"]
    groups = train_groups(shards)
    probe = TokenStream(groups, "train", 0, 1, 0, sf.VOCAB_SIZE, eot_id=sf.SPECIALS["<|endoftext|>"])
    epoch_length = sum(probe._load(i, 0).size for i in range(len(groups)))    # documents + one EOT each
    stream = TokenStream(groups, "train", 0, 1, 0, sf.VOCAB_SIZE, eot_id=sf.SPECIALS["<|endoftext|>"])
    batches = gpt_batches(stream, micro_batch=1, seq_len=epoch_length - 1)
    first, second = next(batches), next(batches)
    assert first.consumed == second.consumed == read_manifest(shards).tokens_train
    assert stream.state.epoch == 1                                             # the second window was epoch 1


def test_bert_pairs_of_one_epoch_consume_every_training_token_once(corpora) -> None:
    shards = corpora["small"]
    for nsp in (True, False):
        stream = PairStream(train_groups(shards), "train", 0, 1, 0, sf.VOCAB_SIZE, ids=IDS, seq_len=64, nsp=nsp)
        consumed = 0
        while True:
            _, count = stream.take_counted()
            if stream.state.epoch == 1:
                break
            consumed += count
        assert consumed == read_manifest(shards).tokens_train


def train(root: Path, shards: Path, **overrides: object) -> tuple[Trainer, list[dict]]:
    config = PretrainConfig.model_validate(sf.nano_config(**{**BUDGET, **overrides}))
    spec = trainer_spec(config, sf.stage_context(root, shards))
    Path(spec.loop.run_dir).mkdir(parents=True, exist_ok=True)      # a second call resumes the first
    trainer = Trainer(spec.loop, make_objective(spec), ENV)
    trainer.fit()
    return trainer, sf.read_metrics(Path(spec.loop.run_dir) / "metrics.jsonl")


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_equal_token_budgets_train_the_same_tokens_on_less_data_by_repeating_epochs(tmp_path: Path, corpora,
                                                                                   arch: str) -> None:
    model = {"preset": f"{arch}-nano"}
    full, full_metrics = train(tmp_path / "full", corpora["full"], model=model)
    small, small_metrics = train(tmp_path / "small", corpora["small"], model=model)
    assert full.cfg.max_steps == small.cfg.max_steps == 12                     # max_tokens / batch_tokens
    if arch == "gpt":                                                         # BERT's count leaves out padding
        assert full.summary["tokens_trained"] == small.summary["tokens_trained"] == 12 * 1024
    available = {name: read_manifest(corpora[name]).tokens_train for name in corpora}
    for trainer, name in ((full, "full"), (small, "small")):
        assert trainer.summary["epochs"] == trainer.summary["data_consumed"] / available[name]
    assert full.summary["epochs"] < 1 < small.summary["epochs"]
    # the same tokens read from either corpus: the epochs are in the inverse ratio of their sizes
    assert small.summary["epochs"] / full.summary["epochs"] == pytest.approx(available["full"] / available["small"],
                                                                             rel=0.2)
    epochs = [m["epochs"] for m in small_metrics]
    assert len(epochs) == 12 and epochs == sorted(epochs) and epochs[-1] == small.summary["epochs"]
    assert "epochs" in full_metrics[0]


def test_epochs_are_checkpointed_and_a_resumed_run_reports_the_same(tmp_path: Path, corpora) -> None:
    whole, _ = train(tmp_path / "whole", corpora["small"], checkpoint_every=5)
    resumed_root = tmp_path / "resumed"
    train(resumed_root, corpora["small"], checkpoint_every=5, max_tokens=5 * 1024)    # stops at step 5
    again, metrics = train(resumed_root, corpora["small"], checkpoint_every=5)
    assert again.resumed_from == 5
    assert again.summary["epochs"] == whole.summary["epochs"]
    assert metrics[-1]["epochs"] == whole.summary["epochs"]
