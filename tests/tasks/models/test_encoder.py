"""Both architectures are encoders: [B, T, d] hidden states that padding does not change."""
from __future__ import annotations

import pytest
import torch
from nanospecs import BERT_IDS, bert_spec, gpt_spec

from tasks.models import GPT, BertForPretraining, Encoder, build_model


@pytest.mark.parametrize("spec", [gpt_spec(), bert_spec(), bert_spec(norm="pre", bias=False)],
                         ids=["gpt", "bert", "bert-pre-ln-no-bias"])
def test_both_architectures_satisfy_the_encoder_protocol(spec) -> None:
    torch.manual_seed(0)
    model = build_model(spec).eval()
    assert isinstance(model, Encoder)
    hidden = model.hidden_states(torch.randint(0, 256, (3, 17)))
    assert hidden.shape == (3, 17, spec.d_model) and torch.isfinite(hidden).all()


def test_gpt_is_causal_and_the_loss_starts_near_uniform() -> None:
    torch.manual_seed(0)
    spec = gpt_spec()
    model = GPT(spec).eval()
    idx = torch.randint(0, 256, (2, 32))
    changed = idx.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 256          # change one future token
    before, after = model(idx).logits, model(changed).logits
    assert torch.equal(before[:, :20], after[:, :20])    # earlier positions cannot see it
    assert not torch.allclose(before[:, 20:], after[:, 20:])
    assert torch.allclose(model.logits(model.hidden_states(idx)), before)   # the LM head sits on hidden_states
    loss = model(idx, torch.randint(0, 256, (2, 32))).lm_loss
    assert abs(loss.item() - torch.log(torch.tensor(float(spec.padded_vocab_size))).item()) < 0.2


def test_gpt_hidden_states_of_real_tokens_ignore_left_and_right_padding() -> None:
    torch.manual_seed(0)
    model = GPT(gpt_spec()).eval()
    real = torch.randint(0, 256, (1, 12))
    alone = model.hidden_states(real, attention_mask=torch.ones_like(real))
    pads = torch.randint(0, 256, (1, 5))                  # whatever sits in padded slots must not matter
    right = model.hidden_states(torch.cat([real, pads], 1), attention_mask=torch.cat(
        [torch.ones_like(real), torch.zeros_like(pads)], 1))
    left = model.hidden_states(torch.cat([pads, real], 1), attention_mask=torch.cat(
        [torch.zeros_like(pads), torch.ones_like(real)], 1))
    assert torch.allclose(right[:, :12], alone, atol=1e-5)
    assert torch.allclose(left[:, 5:], alone, atol=1e-5)
    assert torch.allclose(alone, model.hidden_states(real), atol=1e-5)   # all-ones mask = no mask
    assert torch.isfinite(left).all()                     # padded queries see themselves: no NaN rows


def test_gpt_batches_rows_padded_differently() -> None:
    torch.manual_seed(0)
    model = GPT(gpt_spec()).eval()
    a, b = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 4))
    batch = torch.cat([a, torch.cat([torch.full((1, 5), 7), b], 1)])       # row 2 left-padded by 5
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    hidden = model.hidden_states(batch, attention_mask=mask)
    assert torch.allclose(hidden[0], model.hidden_states(a)[0], atol=1e-5)
    assert torch.allclose(hidden[1, 5:], model.hidden_states(b)[0], atol=1e-5)


def test_gpt_has_no_segments() -> None:
    model = GPT(gpt_spec())
    with pytest.raises(ValueError, match="GPT has no segment embeddings"):
        model.hidden_states(torch.zeros(1, 4, dtype=torch.long), segment_ids=torch.zeros(1, 4, dtype=torch.long))


def test_bert_hidden_states_of_real_tokens_ignore_padding() -> None:
    torch.manual_seed(0)
    model = BertForPretraining(bert_spec()).eval()
    ids = torch.randint(0, 256, (2, 16))
    ids[:, 0] = BERT_IDS["[CLS]"]
    ids[0, 10:], ids[1, 13:] = BERT_IDS["[PAD]"], BERT_IDS["[PAD]"]
    mask = ids != BERT_IDS["[PAD]"]
    garbage = ids.clone()
    garbage[0, 12], garbage[1, 14] = 7, 99               # other ids in padded slots
    hidden, other = model.hidden_states(ids, attention_mask=mask), model.hidden_states(garbage, attention_mask=mask)
    assert torch.allclose(hidden[0, :10], other[0, :10], atol=1e-6) and torch.allclose(hidden[1, :13], other[1, :13],
                                                                                       atol=1e-6)
    alone = model.hidden_states(ids[:1, :10])            # the same sequence with no padding at all
    assert torch.allclose(hidden[0, :10], alone[0], atol=1e-5)
    segments = torch.zeros_like(ids)
    assert torch.equal(model.hidden_states(ids, segments, mask), hidden)    # segments default to sentence A
    segments[:, 5:] = 1
    assert not torch.allclose(model.hidden_states(ids, segments, mask), hidden)
