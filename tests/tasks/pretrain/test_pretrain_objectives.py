"""The two pretraining objectives: chosen once by architecture; BERT's masking lives in its objective."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import shardfixture as sf
import torch

from tasks.models import GPT, IGNORE, BertForPretraining
from tasks.pretrain.config import ModelConfig, PretrainConfig
from tasks.pretrain.objectives import CausalLM, MaskedLM, Masker, make_objective
from tasks.pretrain.stage import trainer_spec

BERT_IDS = {"[CLS]": 257, "[SEP]": 258, "[MASK]": 259, "[PAD]": 260, "[UNK]": 261}
TRAINING = Path(__file__).resolve().parents[3] / "tasks" / "training"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    return sf.write_shards(tmp_path_factory.mktemp("shards"), sf.shakespeare_docs(shared_data, 300), row_group_rows=16)


def objective_for(root: Path, shards: Path, **overrides: object):
    config = PretrainConfig.model_validate(sf.nano_config(**overrides))
    return make_objective(trainer_spec(config, sf.stage_context(root, shards)))


def test_the_objective_is_chosen_by_architecture(tmp_path: Path, shards: Path) -> None:
    gpt = objective_for(tmp_path / "gpt", shards)
    bert = objective_for(tmp_path / "bert", shards, model={"preset": "bert-nano"})
    assert isinstance(gpt, CausalLM) and isinstance(gpt.build_model(), GPT)
    assert isinstance(bert, MaskedLM) and isinstance(bert.build_model(), BertForPretraining)
    assert len(gpt.shard_units(gpt.build_model())) == len(bert.shard_units(bert.build_model())) == 2


def test_the_training_loop_never_branches_on_the_architecture() -> None:
    source = "\n".join(path.read_text() for path in TRAINING.glob("*.py"))
    assert not re.search(r"\barch\b|\bgpt\b|\bbert\b", source, re.IGNORECASE)


def test_masked_lm_inputs_are_masked_afresh_and_drop_nsp_when_off(tmp_path: Path, shards: Path) -> None:
    objective = objective_for(tmp_path, shards, model={"preset": "bert-nano"}, nsp=False)
    batch = next(objective.train_batches(0, 1, 4, None))
    batch.arrays = {k: None if v is None else torch.as_tensor(v) for k, v in batch.arrays.items()}
    generator = torch.Generator().manual_seed(0)
    first, second = objective.inputs(batch, generator), objective.inputs(batch, generator)
    assert "nsp_labels" not in first and {"input_ids", "segment_ids", "mlm_labels"} <= first.keys()
    assert not torch.equal(first["mlm_labels"], second["mlm_labels"])
    again = objective.inputs(batch, torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], first["input_ids"])           # the generator decides, nothing else


def test_mlm_masking_statistics() -> None:
    spec = ModelConfig(preset="bert-nano").resolve(262, BERT_IDS)
    masker, generator = Masker(spec, 0.15), torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (64, 512))
    ids[:, 0], ids[:, 255], ids[:, 400:] = BERT_IDS["[CLS]"], BERT_IDS["[SEP]"], BERT_IDS["[PAD]"]
    corrupted, labels = masker(ids, generator)
    special = torch.isin(ids, torch.tensor(list(BERT_IDS.values())))
    chosen = labels != IGNORE
    assert not (chosen & special).any()                  # specials are never masked
    assert torch.equal(labels[chosen], ids[chosen])
    assert abs(chosen.sum().item() / (~special).sum().item() - 0.15) < 0.005
    as_mask = (corrupted == BERT_IDS["[MASK]"])[chosen].float().mean().item()
    unchanged = (corrupted == ids)[chosen].float().mean().item()
    assert abs(as_mask - 0.8) < 0.01
    assert abs(unchanged - 0.1 - 0.1 / 256) < 0.01         # 10% kept, plus random draws of the same id
    random = corrupted[chosen & (corrupted != ids) & (corrupted != BERT_IDS["[MASK]"])]
    assert not torch.isin(random, torch.tensor(list(BERT_IDS.values()))).any()   # only regular tokens
    assert torch.equal(corrupted[~chosen], ids[~chosen])
    again, _ = masker(ids, generator)
    assert not torch.equal(again, corrupted)             # drawn afresh for every batch


def test_bert_padding_does_not_leak_into_the_losses() -> None:
    torch.manual_seed(0)
    spec = ModelConfig(preset="bert-nano").resolve(262, BERT_IDS, nsp=True)
    model = BertForPretraining(spec).eval()
    ids = torch.randint(0, 256, (1, 16))
    ids[0, 10:] = BERT_IDS["[PAD]"]
    labels = torch.full_like(ids, IGNORE)
    labels[0, 3] = int(ids[0, 3])
    segments, mask = torch.zeros_like(ids), ids != BERT_IDS["[PAD]"]
    out = model(ids, segments, labels, mask, torch.tensor([1]))
    other = ids.clone()
    other[0, 12] = 7                                     # garbage in a padded slot
    assert torch.allclose(model(other, segments, labels, mask, torch.tensor([1])).loss, out.loss, atol=1e-6)
    assert out.loss.item() > out.lm_loss.item() > 0        # MLM plus NSP
