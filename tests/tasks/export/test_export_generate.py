"""Streaming generation: the KV cache changes nothing but the speed; text streams whole; stops where it should."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluate"))
import tinylm  # noqa: E402

from storage.stage import StageError  # noqa: E402
from tasks.export import Generator, Sampling, generate, resolve_source  # noqa: E402
from tasks.export.generate import decode_stream, stream_ids  # noqa: E402
from tasks.models import GPT, load_pretrained  # noqa: E402
from tasks.tokenizer import load_encoding  # noqa: E402

PROMPT = "The history of the city"


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> tinylm.TinyLM:
    return tinylm.tiny_gpt(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def noisy(lm) -> GPT:
    """The trained model plus noise (std 0.3): sampled and greedy paths wander instead of repeating one token."""
    model, _ = load_pretrained(lm.pretrain, "cpu", lm.tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


@pytest.mark.parametrize("prompt_len", [1, 30, 64, 80])        # 64 fills the cache at once; 80 exceeds seq_len
def test_kv_cached_streaming_equals_uncached_and_gpt_generate(noisy, prompt_len):
    prompt = torch.randint(0, 500, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    greedy = Sampling(max_new_tokens=50, temperature=0)
    cached, uncached = list(stream_ids(noisy, prompt, greedy)), list(stream_ids(noisy, prompt, greedy, use_cache=False))
    assert cached == uncached == noisy.generate(torch.tensor([prompt]), 50, temperature=0)[0, prompt_len:].tolist()
    assert len(set(cached)) > 10
    sampling = Sampling(max_new_tokens=50, temperature=1.0, top_k=50)
    draws = [list(stream_ids(noisy, prompt, sampling, torch.Generator().manual_seed(seed), use_cache=cache))
             for seed, cache in ((3, True), (3, False), (4, True))]
    reference = noisy.generate(torch.tensor([prompt]), 50, 1.0, 50, torch.Generator().manual_seed(3))
    assert draws[0] == draws[1] == reference[0, prompt_len:].tolist() != draws[2]


def test_streamed_text_keeps_characters_whole_across_byte_tokens(lm):
    encoding = load_encoding(lm.tokenizer)
    text = "Café 🍵 naïve — 日本"
    ids = list(text.encode("utf-8"))                     # ids 0..255 are the single bytes
    pieces = list(decode_stream(encoding, ids))
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert "🍵" in pieces and len(pieces) == len(text)
    assert "".join(decode_stream(encoding, ids[:-1])) == text[:-1] + "\ufffd"    # a cut character is marked


def test_streamed_pieces_add_up_to_the_decoded_tokens(lm, noisy):
    sampling = Sampling(max_new_tokens=70, temperature=1.2, top_k=None, seed=11)   # past seq_len 64
    generator = Generator(resolve_source(lm.pretrain, lm.tokenizer), "cpu", sampling)
    generator.model = noisy
    out = io.StringIO()
    completion = generator.complete(PROMPT, out)
    ids = list(stream_ids(noisy, generator.encoding.encode_ordinary(PROMPT), sampling,
                          torch.Generator().manual_seed(11)))[: completion.tokens]
    assert out.getvalue() == completion.text == generator.encoding.decode(ids, errors="replace")
    assert completion.tokens == 70 and completion.stop == "length"


def test_generation_stops_at_end_of_text(lm):
    model, spec = load_pretrained(lm.pretrain, "cpu", lm.tokenizer)
    eot = spec.special_tokens["<|endoftext|>"]
    with torch.no_grad():      # every position's hidden state points at the end-of-text embedding
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.wte.weight[eot] = 1.0
    generator = Generator(resolve_source(lm.pretrain, lm.tokenizer), "cpu", Sampling(max_new_tokens=20, temperature=0))
    generator.model = model
    completion = generator.complete(PROMPT)
    assert completion.text == "" and completion.tokens == 0 and completion.stop == "eot"


def test_generate_streams_text_and_writes_jsonl(lm, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("First line\n\nSecond\\nline two\n")
    out = io.StringIO()
    done = generate(lm.pretrain, [PROMPT], Sampling(max_new_tokens=12, seed=1), out, tokenizer=lm.tokenizer,
                    prompts_file=prompts)
    assert [c.prompt for c in done] == [PROMPT, "First line", "Second\nline two"]
    assert out.getvalue() == "\n---\n".join(c.prompt + c.text + "\n" for c in done)
    again = io.StringIO()
    generate(lm.pretrain, [PROMPT], Sampling(max_new_tokens=12, seed=1), again, "jsonl", lm.tokenizer,
             prompts_file=prompts)
    lines = [json.loads(line) for line in again.getvalue().splitlines()]
    assert [(r["prompt"], r["text"], r["tokens"]) for r in lines] == [(c.prompt, c.text, c.tokens) for c in done]


def test_bad_requests_are_refused_with_the_reason(lm, tmp_path):
    from tasks.models import build_model
    from tasks.models.files import write_model
    from storage.formats import ModelSpec

    out = io.StringIO()
    with pytest.raises(StageError, match="nothing to continue"):
        generate(lm.pretrain, [], Sampling(), out, tokenizer=lm.tokenizer)
    with pytest.raises(StageError, match="--format 'xml'"):
        generate(lm.pretrain, ["x"], Sampling(), out, "xml", lm.tokenizer)
    with pytest.raises(StageError, match="missing.txt: prompts file not found"):
        generate(lm.pretrain, [], Sampling(), out, tokenizer=lm.tokenizer, prompts_file=tmp_path / "missing.txt")
    with pytest.raises(StageError, match="top_k >= 1"):
        Sampling(top_k=0)
    encoding = load_encoding(lm.tokenizer)
    specials = {n: encoding.encode_single_token(n) for n in ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]")}
    spec = ModelSpec(arch="bert", n_layer=1, n_head=2, d_model=32, d_mlp=64, seq_len=64, vocab_size=512,
                     padded_vocab_size=512, norm="post", special_tokens=specials)
    (tmp_path / "bert").mkdir()
    write_model(tmp_path / "bert", build_model(spec).state_dict(), spec)
    with pytest.raises(StageError, match="a BERT .masked LM. does not generate text left to right"):
        generate(tmp_path / "bert", ["x"], Sampling(), out, tokenizer=lm.tokenizer)
