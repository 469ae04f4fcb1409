"""HF export round trip: transformers (offline, no custom code) computes what lmforge computes."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers  # the test extra: a missing one fails here, never skips

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluate"))
import tinylm  # noqa: E402

from storage.formats import ModelSpec  # noqa: E402
from storage.stage import StageError  # noqa: E402
from storage.workspace import Workspace  # noqa: E402
from tasks.export import ExportError, export, find_tokenizer, resolve_source  # noqa: E402
from tasks.models import build_model, load_pretrained  # noqa: E402
from tasks.models.files import write_model  # noqa: E402
from tasks.tokenizer import load_encoding  # noqa: E402

DATA = tinylm.SHARED_DATA
REAL_TEXTS = [(DATA / "raw/wikitext-2_test.txt").read_text()[:20_000],
              (DATA / "raw/tinyshakespeare_input.txt").read_text()[:20_000],
              "".join(json.loads(line)["text"] for line in (DATA / "raw/dolma_ccnet_cc_en_head-0091.jsonl")
                      .read_text().splitlines()[:3]),
              "Numbers 1234567 3.14159, CRLF\r\nand   runs\tof\t\tspace; ünïcödé — 日本語 👍🏽 «quotes»"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> tinylm.TinyLM:
    return tinylm.tiny_gpt(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def encoding(lm):
    return load_encoding(lm.tokenizer)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, lm) -> Path:
    return export(lm.pretrain, tmp_path_factory.mktemp("hf") / "gpt", tokenizer=lm.tokenizer)


def perturbed(model: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """The trained weights plus noise: greedy paths that wander (a tiny trained model repeats itself)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.add_(torch.randn(param.shape, generator=generator) * std)
    return model


def test_the_folder_has_the_hf_files_and_the_real_vocabulary_only(exported, lm):
    assert sorted(p.name for p in exported.iterdir()) == sorted([
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"])
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["activation_function"] == "gelu"
    assert config["vocab_size"] == tinylm.VOCAB_SIZE and config["n_positions"] == 64 and config["tie_word_embeddings"]
    tensors = safetensors.torch.load_file(exported / "model.safetensors")
    assert "lm_head.weight" not in tensors and tensors["transformer.wte.weight"].shape == (tinylm.VOCAB_SIZE, 64)
    model, info = transformers.GPT2LMHeadModel.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info                  # no missing, unexpected or mismatched weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()    # tied


def test_logits_on_real_text_equal_lmforge_within_1e4(exported, lm, encoding):
    ours, spec = load_pretrained(lm.pretrain, "cpu", lm.tokenizer)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    for text in REAL_TEXTS[:3]:
        ids = torch.tensor(encoding.encode_ordinary(text)[: 4 * spec.seq_len]).view(4, spec.seq_len)
        with torch.no_grad():
            expected = ours(ids).logits[..., : spec.vocab_size]
            found = theirs(ids).logits
        assert found.shape == expected.shape and (found - expected).abs().max() < 1e-4


@pytest.mark.parametrize("loader", ["PreTrainedTokenizerFast", "AutoTokenizer"])
def test_the_tokenizer_gives_identical_ids_and_decodes_back(exported, encoding, loader):
    tokenizer = getattr(transformers, loader).from_pretrained(exported)
    assert len(tokenizer) == tinylm.VOCAB_SIZE and tokenizer.eos_token_id == encoding.eot_token
    for text in REAL_TEXTS:
        ids = encoding.encode_ordinary(text)
        assert tokenizer.encode(text) == ids == tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("loader", ["PreTrainedTokenizerFast", "AutoTokenizer"])
def test_special_token_names_in_text_stay_text(exported, encoding, loader):
    """"<|endoftext|>" or "[CLS]" written in a document is text, as lmforge encodes it; HF used to give the special id."""
    tokenizer = getattr(transformers, loader).from_pretrained(exported)
    text = "a <|endoftext|> b [CLS] c[SEP][PAD]"
    ids = encoding.encode_ordinary(text)
    assert encoding.eot_token not in ids
    assert tokenizer.encode(text) == ids == tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_greedy_generation_gives_the_same_tokens(exported, lm, encoding, tmp_path):
    ours, spec = load_pretrained(lm.pretrain, "cpu", lm.tokenizer)
    noisy_dir = tmp_path / "noisy-model"
    noisy_dir.mkdir()
    write_model(noisy_dir, perturbed(ours).state_dict(), spec)
    noisy_export = export(noisy_dir, tmp_path / "noisy-hf", tokenizer=lm.tokenizer)
    for model_dir, folder in ((lm.pretrain, exported), (noisy_dir, noisy_export)):
        model, _ = load_pretrained(model_dir, "cpu", lm.tokenizer)
        theirs = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
        for start in (0, 9000):
            prompt = torch.tensor([encoding.encode_ordinary(REAL_TEXTS[0][start:start + 200])[:16]])
            expected = model.generate(prompt, 48, temperature=0)
            found = theirs.generate(prompt, max_new_tokens=48, do_sample=False, eos_token_id=None)
            assert found.tolist() == expected.tolist()
    wandering = model.generate(prompt, 48, temperature=0)[0, 16:].tolist()
    assert len(set(wandering)) > 8


@pytest.fixture(scope="module")
def bert_specials(encoding) -> dict[str, int]:
    return {name: encoding.encode_single_token(name) for name in ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]")}


def bert_dir(root: Path, specials: dict[str, int], **fields) -> tuple[Path, torch.nn.Module]:
    spec = ModelSpec(**{"arch": "bert", "n_layer": 2, "n_head": 2, "d_model": 64, "d_mlp": 256, "seq_len": 64,
                        "vocab_size": 512, "padded_vocab_size": 640, "norm": "post", "layer_norm_eps": 1e-12,
                        "nsp": True, "special_tokens": specials, **fields})
    torch.manual_seed(0)
    model = perturbed(build_model(spec), std=0.1).eval()
    root.mkdir(parents=True)
    write_model(root, model.state_dict(), spec)
    return root, model


@pytest.mark.parametrize("nsp, bias, hf_class", [(True, True, "BertForPreTraining"), (False, False, "BertForMaskedLM")])
def test_bert_round_trip(tmp_path, lm, encoding, bert_specials, nsp, bias, hf_class):
    folder, ours = bert_dir(tmp_path / "bert", bert_specials, nsp=nsp, bias=bias)
    out = export(folder, tmp_path / "hf", tokenizer=lm.tokenizer)
    assert json.loads((out / "config.json").read_text())["architectures"] == [hf_class]
    theirs, info = getattr(transformers, hf_class).from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    first, second = REAL_TEXTS[0][:120], REAL_TEXTS[1][:60]        # within the 64 positions
    batch = tokenizer([first, second], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist()[: len(encoding.encode_ordinary(first)) + 2] == \
        [bert_specials["[CLS]"], *encoding.encode_ordinary(first), bert_specials["[SEP]"]]
    with torch.no_grad():
        hidden = ours.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"])
        expected = ours.mlm_logits(hidden)[..., :512]
        found = theirs.eval()(**batch)
    real = batch["attention_mask"].bool()
    assert (found.logits if not nsp else found.prediction_logits)[real].sub(expected[real]).abs().max() < 1e-4
    if nsp:
        pooled = torch.tanh(ours.bert.pooler(hidden[:, 0]))
        assert (found.seq_relationship_logits - ours.nsp_head(pooled)).abs().max() < 1e-4
    pair = tokenizer("a b", "c")["input_ids"]
    assert pair[0] == bert_specials["[CLS]"] and pair.count(bert_specials["[SEP]"]) == 2


def test_what_hf_cannot_express_is_refused_with_the_reason(tmp_path, lm, bert_specials, encoding):
    moe = ModelSpec(arch="gpt", n_layer=1, n_head=2, d_model=64, d_mlp=128, seq_len=64, vocab_size=512,
                    padded_vocab_size=512, n_experts=4, top_k=2, special_tokens={"<|endoftext|>": encoding.eot_token})
    (tmp_path / "moe").mkdir()
    write_model(tmp_path / "moe", build_model(moe).state_dict(), moe)
    with pytest.raises(ExportError, match="mixture-of-experts MLP .4 experts, top-2.; GPT2LMHeadModel has one dense"):
        export(tmp_path / "moe", tmp_path / "out", tokenizer=lm.tokenizer)
    pre_ln, _ = bert_dir(tmp_path / "pre", bert_specials, norm="pre")
    with pytest.raises(ExportError, match="norm='pre': HF's BertModel is post-LayerNorm only"):
        export(pre_ln, tmp_path / "out", tokenizer=lm.tokenizer)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_an_existing_output_folder_is_never_overwritten(tmp_path, lm, exported):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="busy: exists and is not an empty folder"):
        export(lm.pretrain, tmp_path / "busy", tokenizer=lm.tokenizer)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(StageError, match="--format 'onnx'"):
        export(lm.pretrain, tmp_path / "x", format="onnx", tokenizer=lm.tokenizer)


def commit(ws: Workspace, stage: str, fingerprint: str, source: Path, inputs: dict[str, tuple[str, str]]) -> Path:
    """Copies `source` in as a committed stage output whose records name its inputs (stage, fingerprint)."""
    tmp = ws.new_temp_dir(stage, fingerprint)
    shutil.copytree(source, tmp, dirs_exist_ok=True)
    record = {"input_stages": {k: s for k, (s, _) in inputs.items()},
              "input_fingerprints": {k: f for k, (_, f) in inputs.items()}}
    return ws.commit(stage, fingerprint, tmp, record)


def test_the_tokenizer_is_found_through_the_workspace_records(tmp_path, lm):
    ws = Workspace(tmp_path / "ws")
    tokenizer = commit(ws, "tokenizer", "tok000000001", lm.tokenizer, {})
    pretrain = commit(ws, "pretrain", "pre000000001", lm.pretrain,
                      {"shard": ("shard", "shd000000001"), "tokenizer": ("tokenizer", "tok000000001")})
    # a later stage that read the pretrain output (a fine-tune) is followed back to the same tokenizer
    later = commit(ws, "finetune", "fin000000001", lm.pretrain, {"pretrain": ("pretrain", "pre000000001")})
    step = next((pretrain / "checkpoints").iterdir())
    for path in (pretrain, pretrain / "model", step, later):
        assert find_tokenizer(path) == tokenizer
        assert resolve_source(path).tokenizer_dir == tokenizer
    out = export(pretrain, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == tinylm.VOCAB_SIZE
    with pytest.raises(StageError, match="not inside a committed stage output .* pass --tokenizer DIR"):
        find_tokenizer(lm.pretrain)


def finetuned_gpt(root: Path, lm: tinylm.TinyLM) -> Path:
    """A GPT fine-tuned task model as the finetune stage writes it: encoder.* + head.*, three task-token rows."""
    from tasks.finetune.checkpoint import build_task_model, save_finetuned
    from tasks.finetune.model import HeadSpec

    _, base = load_pretrained(lm.pretrain, "cpu", lm.tokenizer)
    tokens = {"start": 512, "delim": 513, "extract": 514}          # new ids past the 512-id vocabulary
    head = HeadSpec(task="topic", kind="classify", family="gpt", n_outputs=3, labels=["a", "b", "c"], form="single",
                    max_length=64, task_tokens=tokens, pad_id=encoding_of(lm).eot_token, init="pretrained")
    torch.manual_seed(0)
    model = build_task_model(base, head, lm.pretrain, dropout=0.0, extra_rows=3)
    return save_finetuned(root / "topic" / "model", model, model.encoder.spec, head)


def encoding_of(lm: tinylm.TinyLM):
    return load_encoding(lm.tokenizer)


def test_a_fine_tuned_gpt_exports_and_generates_as_its_language_model(tmp_path, lm, encoding):
    import io

    from tasks.export import Sampling, generate

    ws = Workspace(tmp_path / "ws")
    commit(ws, "tokenizer", "tok000000001", lm.tokenizer, {})
    staged = tmp_path / "staged"
    finetuned_gpt(staged, lm)
    finetune = commit(ws, "finetune", "fin000000001", staged, {"tokenizer": ("tokenizer", "tok000000001")})
    with pytest.raises(StageError, match=r"holds one model per task \(topic\); name one"):
        export(finetune, tmp_path / "hf")
    out = export(finetune / "topic", tmp_path / "hf")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ours, spec = load_pretrained(lm.pretrain, "cpu", lm.tokenizer)     # not trained further: the same LM
    ids = torch.tensor([encoding.encode_ordinary(REAL_TEXTS[0])[:64]])
    with torch.no_grad():
        assert theirs.transformer.wte.weight.shape[0] == spec.vocab_size        # task-token rows left out
        assert (theirs(ids).logits - ours(ids).logits[..., : spec.vocab_size]).abs().max() < 1e-4
    texts = [io.StringIO(), io.StringIO()]
    for folder, text in zip((finetune / "topic" / "model", lm.pretrain), texts):
        generate(folder, ["The city"], Sampling(max_new_tokens=12, seed=2), text, tokenizer=lm.tokenizer)
    assert texts[0].getvalue() == texts[1].getvalue()
