"""The scorer: harness windows and token boundaries, strided held-out scoring, bits per byte, batching."""
from __future__ import annotations

import math

import pytest
import tiktoken
import torch
import torch.nn.functional as F
import tinylm

from storage.formats import ModelSpec
from tasks.evaluate.heldout import causal_lm
from tasks.evaluate.prompts import encode_pairs
from tasks.evaluate.scoring import Scorer, Window, request_window, strided_windows
from tasks.models import GPT, load_pretrained
from tasks.tokenizer import load_encoding

WIKITEXT = tinylm.SHARED_DATA / "raw" / "wikitext-2_test.txt"


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> tinylm.TinyLM:
    return tinylm.tiny_gpt(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def encoding(lm) -> tiktoken.Encoding:
    return load_encoding(lm.tokenizer)


@pytest.fixture(scope="module")
def model(lm) -> tuple[GPT, ModelSpec]:
    return load_pretrained(lm.pretrain, "cpu", lm.tokenizer)


def text(chars: int, start: int = 0) -> str:
    return WIKITEXT.read_text(encoding="utf-8")[start:start + chars]


def direct_logprobs(model: GPT, ids: list[int]) -> torch.Tensor:
    """log p(ids[i+1] | ids[:i+1]) from one plain forward, over the real vocabulary."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :, : model.spec.vocab_size]
    return F.log_softmax(logits.float(), -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def test_a_request_is_cut_from_the_left_and_scores_only_the_continuation():
    window = request_window(list(range(100)), [100, 101, 102], seq_len=64)
    assert window.inputs == list(range(38, 102)) and window.targets == list(range(39, 103)) and window.n_scored == 3
    short = request_window([7, 8], [9], seq_len=64)
    assert short.inputs == [7, 8] and short.targets == [8, 9] and short.n_scored == 1
    with pytest.raises(ValueError, match="does not fit a window of 64"):
        request_window([1], list(range(65)), seq_len=64)


@pytest.mark.parametrize("stride", [1, 5, 16, 64])
def test_strided_windows_score_every_token_once_with_enough_context(stride):
    tokens = list(range(1000, 1300))
    windows = strided_windows(tokens, prefix_id=0, seq_len=64, stride=stride)
    scored = [t for w in windows for t in w.targets[len(w.targets) - w.n_scored:]]
    assert scored == tokens
    for w in windows:
        assert len(w.inputs) <= 64 and w.inputs[1:] == w.targets[:-1]
    for w in windows[1:]:     # the first scored token of a later window sees seq_len - stride tokens or more
        assert len(w.inputs) - w.n_scored + 1 >= 64 - stride
    with pytest.raises(ValueError, match="stride 65 must be in 1..seq_len"):
        strided_windows(tokens, 0, 64, 65)


def test_strided_perplexity_equals_the_non_strided_one_when_the_text_fits_one_window(model, encoding):
    gpt, spec = model
    scorer = Scorer(gpt, spec, torch.device("cpu"))
    short = text(400)
    tokens = encoding.encode_ordinary(short)[: spec.seq_len - 1]
    short = encoding.decode(tokens)
    strided = causal_lm(scorer, encoding, short, stride=7)
    whole = causal_lm(scorer, encoding, short, stride=spec.seq_len)
    assert strided == whole and strided["windows"] == 1 and strided["tokens"] == len(tokens)
    expected = -direct_logprobs(gpt, [encoding.eot_token, *tokens]).sum().item()
    assert strided["loss"] == pytest.approx(expected / len(tokens), rel=1e-6)
    assert strided["bpb"] == pytest.approx(expected / math.log(2) / len(short.encode()), rel=1e-6)


def test_overlapping_windows_give_tokens_more_context_and_a_lower_loss(model, encoding):
    gpt, spec = model
    scorer = Scorer(gpt, spec, torch.device("cpu"))
    long = text(20_000)
    disjoint, strided = causal_lm(scorer, encoding, long, spec.seq_len), causal_lm(scorer, encoding, long, 16)
    assert disjoint["tokens"] == strided["tokens"] and strided["windows"] > 3 * disjoint["windows"]
    assert strided["loss"] < disjoint["loss"]


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_times_tokens_over_bytes(encoding):
    # 512 real ids in 640 embedding rows: a softmax over the padding rows would give log2(640) instead.
    spec = ModelSpec(arch="gpt", n_layer=1, n_head=2, d_model=32, d_mlp=64, seq_len=32, vocab_size=512,
                     padded_vocab_size=640, special_tokens={"<|endoftext|>": encoding.eot_token})
    uniform = GPT(spec).eval()
    with torch.no_grad():
        uniform.wte.weight.zero_()          # every logit 0: p = 1/512 for every real id
    sample = text(3000, start=5000)
    found = causal_lm(Scorer(uniform, spec, torch.device("cpu")), encoding, sample, stride=20)
    n_tokens, n_bytes = len(encoding.encode_ordinary(sample)), len(sample.encode("utf-8"))
    assert found["tokens"] == n_tokens and found["bytes"] == n_bytes
    assert found["bpb"] == pytest.approx(math.log2(512) * n_tokens / n_bytes, rel=1e-6)   # fp32 softmax
    assert found["ppl"] == pytest.approx(512, rel=1e-6)


def test_scores_do_not_depend_on_how_windows_are_batched(model):
    gpt, spec = model
    generator = torch.Generator().manual_seed(0)
    windows = []
    for length in (5, 64, 17, 40, 3, 64, 22):
        ids = torch.randint(0, spec.vocab_size, (length + 1,), generator=generator).tolist()
        windows.append(Window(ids[:-1], ids[1:], min(length, 4)))
    one = Scorer(gpt, spec, torch.device("cpu"), batch_tokens=64).score(windows)
    many = Scorer(gpt, spec, torch.device("cpu"), batch_tokens=100_000).score(windows)
    assert [s.argmax for s in one] == [s.argmax for s in many]
    assert [s.logprob for s in one] == pytest.approx([s.logprob for s in many], abs=1e-4)
    for window, score in zip(windows, one):      # each equals its own plain forward pass
        with torch.no_grad():
            logits = gpt(torch.tensor([window.inputs])).logits[0, :, : spec.vocab_size]
        expected = F.log_softmax(logits, -1).gather(1, torch.tensor(window.targets)[:, None])[-window.n_scored:]
        assert score.logprob == pytest.approx(expected.sum().item(), abs=1e-4)
        assert score.targets == tuple(window.targets[-window.n_scored:])


def test_batches_are_longest_first_within_the_token_budget_and_little_padding():
    scorer = Scorer(None, None, torch.device("cpu"), batch_tokens=100)   # type: ignore[arg-type]
    lengths = [10, 50, 20, 50, 30, 5]
    batches = list(scorer.batches(lengths))
    assert batches == [[1, 3], [4, 2], [0], [5]]
    for batch in batches:
        padded = len(batch) * lengths[batch[0]]
        assert padded <= 100 and (len(batch) == 1 or padded <= 1.25 * sum(lengths[i] for i in batch))


def test_the_context_continuation_boundary_is_the_harness_one(encoding):
    eot = encoding.eot_token
    pairs = [("Question: why?\nAnswer:", " because"), ("The cat sat on the ", "mat"), ("", " hello"),
             ("Answer:  ", "two spaces")]
    encoded = encode_pairs(encoding, pairs, eot)
    # trailing whitespace moves to the continuation; the continuation is the joint ids past the context's
    for (context, continuation), (ctx, cont) in zip(pairs[:2], encoded[:2]):
        stripped = context.rstrip()
        assert ctx == encoding.encode_ordinary(stripped)
        assert cont == encoding.encode_ordinary(stripped + context[len(stripped):] + continuation)[len(ctx):]
    assert encoding.decode(encoded[1][1]) == " mat"
    assert encoded[2] == ([eot], encoding.encode_ordinary(" hello"))     # an empty context: end-of-text
    assert encoding.decode(encoded[3][0]) == "Answer:" and encoding.decode(encoded[3][1]) == "  two spaces"
    assert encode_pairs(encoding, [("<|endoftext|>", " [MASK]")], eot)[0][0] != [eot]   # plain text stays text
