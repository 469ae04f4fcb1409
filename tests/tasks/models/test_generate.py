"""GPT.generate: a KV cache that changes nothing but the speed, seeded sampling, contexts past seq_len."""
from __future__ import annotations

import pytest
import torch
from nanospecs import gpt_spec

from tasks.models import GPT


@pytest.fixture(scope="module")
def model() -> GPT:
    """A gpt-nano with only 16 positions, so continuations run well past them.

    Its matrices are drawn with std 0.3, not 0.02: a freshly initialised model repeats one token
    forever, which would hide a cache that attends to the wrong positions.
    """
    torch.manual_seed(0)
    model = GPT(gpt_spec(seq_len=16)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("prompt_len", [1, 5, 16, 23])      # 16 fills the cache at once; 23 exceeds seq_len
def test_cached_and_uncached_greedy_generation_agree(model: GPT, prompt_len: int) -> None:
    prompt = torch.randint(0, 256, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    cached = model.generate(prompt, 30, temperature=0)
    uncached = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + 30) and torch.equal(cached[:, :prompt_len], prompt)
    assert torch.equal(cached, uncached)
    assert min(len(set(row[prompt_len:].tolist())) for row in cached) > 10    # the path wanders


def test_cached_logits_match_a_full_forward(model: GPT) -> None:
    from tasks.models.layers import KVCache

    idx = torch.randint(0, 256, (2, 12))
    cache = KVCache(len(model.blocks), model.spec.seq_len)
    steps = [model(idx[:, :7], cache=cache).logits] + [model(idx[:, t:t + 1], cache=cache).logits
                                                       for t in range(7, 12)]
    assert cache.length == 12
    assert torch.allclose(torch.cat(steps, 1), model(idx).logits, atol=1e-5)


def test_sampling_with_a_seeded_generator_is_deterministic(model: GPT) -> None:
    prompt = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(1))

    def sample(seed: int) -> torch.Tensor:
        return model.generate(prompt, 24, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(seed))

    first = sample(0)
    assert torch.equal(first, sample(0))
    assert not torch.equal(first, sample(1))


def test_generate_never_draws_padding_ids() -> None:
    torch.manual_seed(0)
    model = GPT(gpt_spec(vocab_size=130, padded_vocab_size=256)).eval()     # ids 130..255 are padding
    with torch.no_grad():
        model.wte.weight[130:] = 50.0                    # padding rows would dominate the softmax
    start = torch.zeros((3, 1), dtype=torch.long)
    sampled = model.generate(start, 20, temperature=1.0, top_k=None, generator=torch.Generator().manual_seed(0))
    greedy = model.generate(start, 20, temperature=0)
    assert sampled.shape == greedy.shape == (3, 21) and int(sampled.max()) < 130 and int(greedy.max()) < 130
