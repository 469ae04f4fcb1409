"""GPT and BERT with the kernels on: the same losses and the same gradients, tied embeddings included."""
from __future__ import annotations

import copy

import pytest
import torch

from kernels import LAUNCHES
from tasks.models import GPT, BertForPretraining
from tasks.pretrain.config import KernelsConfig, ModelConfig
from tasks.pretrain.objectives import use_kernels

GPT_IDS = {"<|endoftext|>": 256}
BERT_IDS = {"[CLS]": 257, "[SEP]": 258, "[MASK]": 259, "[PAD]": 260, "[UNK]": 261}
ALL_ON = KernelsConfig(fused_ce=True, fused_norm=True)


def twins(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(plain model, a copy with the same weights on the kernels)."""
    return model, use_kernels(copy.deepcopy(model), ALL_ON)


def assert_same_training_signal(plain: torch.nn.Module, fused: torch.nn.Module, inputs: dict) -> None:
    """Equal loss and equal gradient for every parameter, compared by name (the tied embedding's gradient
    holds both the lookup's share and the head's)."""
    losses = []
    for model in (plain, fused):
        out = model(**inputs)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    fused_grads = dict(fused.named_parameters())
    for name, param in plain.named_parameters():
        torch.testing.assert_close(fused_grads[name].grad, param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gpt_loss_and_gradients_tied_embedding_included() -> None:
    torch.manual_seed(0)
    plain, fused = twins(GPT(ModelConfig(preset="gpt-nano").resolve(262, GPT_IDS)))
    idx = torch.randint(0, 262, (3, 21))
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -1                                   # GPT's own ignore index
    before = (LAUNCHES["cross_entropy_rows"], LAUNCHES["layer_norm_backward"])
    assert_same_training_signal(plain, fused, {"idx": idx, "targets": targets})
    assert LAUNCHES["cross_entropy_rows"] > before[0] and LAUNCHES["layer_norm_backward"] >= before[1] + 5
    assert fused(idx, targets).logits is None and fused(idx).logits.shape == (3, 21, 384)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_bert_masked_lm_head_after_its_dense_and_layernorm(bias: bool) -> None:
    torch.manual_seed(0)
    spec = ModelConfig(preset="bert-nano", bias=bias).resolve(262, BERT_IDS, nsp=True)
    plain, fused = twins(BertForPretraining(spec))
    ids = torch.randint(0, 256, (2, 30))
    labels = torch.full_like(ids, -100)
    labels[:, 3::4] = ids[:, 3::4]                        # masked positions only are scored
    inputs = {"input_ids": ids, "segment_ids": torch.zeros_like(ids), "mlm_labels": labels,
              "nsp_labels": torch.tensor([0, 1])}
    assert_same_training_signal(plain, fused, inputs)
    assert (fused.mlm_bias is not None) == bias


def test_bert_batch_with_nothing_masked_has_zero_mlm_loss() -> None:
    torch.manual_seed(0)
    _, fused = twins(BertForPretraining(ModelConfig(preset="bert-nano").resolve(262, BERT_IDS)))
    ids = torch.randint(0, 256, (2, 16))
    out = fused(ids, torch.zeros_like(ids), torch.full_like(ids, -100))
    assert out.lm_loss.item() == 0.0
    out.loss.backward()                                   # a graph all the same, no NaN gradients
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters() if p.grad is not None)


def test_kernels_off_leaves_the_model_as_built() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(preset="gpt-nano").resolve(262, GPT_IDS))
    types = [type(m) for m in model.modules()]
    use_kernels(model, KernelsConfig())
    assert [type(m) for m in model.modules()] == types and not model.fused_ce
