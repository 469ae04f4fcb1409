"""The tokenizer stage on real corpora: round trips, tiktoken/HF agreement, specials, offline loading."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiktoken.load import load_tiktoken_bpe
from pydantic import ValidationError
from tokenizers import Tokenizer

from storage.documents import Document, document_files
from storage.formats import TokenizerFile
from storage.stage import StageError
from tasks.tokenizer import (CONFIG_FILE, HF_FILE, RANKS_FILE, TokenizerConfig, external_inputs, load_encoding,
                             read_vocabulary, run)
from tasks.tokenizer.corpus import select_heldout
from tasks.tokenizer.hf import onig_pattern
from tokdata import HARD_STRINGS, raw_corpus_documents, stage_context, write_documents

BERT_SPECIALS = ["[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"]


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return raw_corpus_documents()


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory: pytest.TempPathFactory, corpus: list[Document]) -> Path:
    return write_documents(tmp_path_factory.mktemp("raw_docs"), corpus)


def train(root: Path, docs_dir: Path, name: str = "tokenizer", **fields) -> tuple[Path, dict]:
    fields = {**({} if fields.get("pretrained") else {"heldout_docs": 200, "vocab_size": 1024}), **fields}
    ctx = stage_context(root, "tokenizer", {"documents": docs_dir}, name)
    result = run(TokenizerConfig(**fields), ctx)
    return ctx.output, result.stats


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, docs_dir: Path) -> tuple[Path, dict]:
    return train(tmp_path_factory.mktemp("trained"), docs_dir, special_tokens=["<|endoftext|>", *BERT_SPECIALS])


def test_round_trip_and_hf_ids_on_every_real_document(trained, corpus):
    out, _ = trained
    encoding = load_encoding(out)
    hf = Tokenizer.from_file(str(out / HF_FILE))
    hf.encode_special_tokens = True      # plain text, as tiktoken's encode_ordinary reads it
    texts = [doc.text for doc in corpus]
    ids = encoding.encode_ordinary_batch(texts, num_threads=2)
    hf_ids = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    for doc, tokens, hf_tokens in zip(corpus, ids, hf_ids):
        assert encoding.decode(tokens) == doc.text, doc.id
        assert hf_tokens == tokens, doc.id
    assert hf.decode(hf_ids[-1]) == texts[-1]
    assert {doc.source for doc in corpus} == {"shakespeare", "wikitext", "ccnet", "cc_warc", "wget_warc"}


def test_round_trip_on_hard_strings(trained):
    out, _ = trained
    encoding = load_encoding(out)
    hf = Tokenizer.from_file(str(out / HF_FILE))
    hf.encode_special_tokens = True
    for text in HARD_STRINGS:
        tokens = encoding.encode_ordinary(text)
        assert encoding.decode(tokens) == text, repr(text)
        assert hf.encode(text, add_special_tokens=False).ids == tokens, repr(text)
    # lone surrogates cannot be UTF-8: they come back as U+FFFD, the rest intact
    assert encoding.decode(encoding.encode_ordinary("a\ud800b\udfffc")) == "a\ufffdb\ufffdc"


def test_special_tokens_follow_the_ranks_and_never_come_from_text(trained):
    out, stats = trained
    config = json.loads((out / CONFIG_FILE).read_text())
    n_ranks = config["n_ranks"]
    assert config["special_tokens"] == {name: n_ranks + i for i, name in enumerate(["<|endoftext|>", *BERT_SPECIALS])}
    assert config["vocab_size"] == stats["vocab_size"] == n_ranks + 6 == 1024
    encoding = load_encoding(out)
    special_ids = set(config["special_tokens"].values())
    text = "end<|endoftext|>start [CLS] a [MASK] b [SEP][PAD][UNK]"
    tokens = encoding.encode_ordinary(text)
    assert not special_ids & set(tokens)
    assert encoding.decode(tokens) == text
    # the ids do exist, for callers that ask for them explicitly
    assert encoding.encode("[MASK]", allowed_special={"[MASK]"}) == [config["special_tokens"]["[MASK]"]]
    hf = Tokenizer.from_file(str(out / HF_FILE))
    assert hf.token_to_id("[MASK]") == config["special_tokens"]["[MASK]"]


def test_rank_file_is_tiktoken_format(trained, monkeypatch):
    out, _ = trained
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")          # read the file directly, cache nothing
    ranks = load_tiktoken_bpe(str(out / RANKS_FILE))
    assert ranks == read_vocabulary(out).ranks
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert all(bytes([b]) in ranks for b in range(256))


def test_stats_come_from_the_held_out_documents(trained, corpus, docs_dir):
    _, stats = trained
    files = document_files(docs_dir)
    heldout = select_heldout(files, 200)
    assert select_heldout(files[::-1], 200) == heldout        # the choice ignores file order
    assert len(heldout) == stats["heldout_docs"] == 200
    training = [doc for doc in corpus if doc.text and doc.id not in heldout]
    assert stats["train_docs"] == len(training)
    assert stats["train_chars"] == sum(min(len(doc.text), 10_000) for doc in training)
    assert 2.0 < stats["bytes_per_token"] < 6.0
    assert 0.2 < stats["vocab_used_fraction"] <= 1.0
    assert stats["n_ranks"] + stats["n_special_tokens"] == stats["vocab_size"]


def test_toy_corpus_first_merge_is_TA(tmp_path):
    docs = write_documents(tmp_path / "docs", [Document("toy", "AACGCACTATATA", "toy")])
    out, stats = train(tmp_path, docs, vocab_size=258, special_tokens=["<|endoftext|>"])
    vocab = read_vocabulary(out)
    assert {token: rank for token, rank in vocab.ranks.items() if rank >= 256} == {b"TA": 256}
    assert vocab.special_tokens == {"<|endoftext|>": 257}
    assert stats["train_chars"] == 13 and stats["heldout_docs"] == 0


def test_small_corpus_stops_early_and_specials_still_follow(tmp_path):
    docs = write_documents(tmp_path / "docs", [Document("toy", "AACGCACTATATA", "toy")])
    out, stats = train(tmp_path, docs, vocab_size=400, special_tokens=["[PAD]", "[MASK]"])
    vocab = read_vocabulary(out)
    merged = sorted((rank, token) for token, rank in vocab.ranks.items() if rank >= 256)
    assert merged[:2] == [(256, b"TA"), (257, b"AC")]
    assert vocab.special_tokens == {"[PAD]": len(vocab.ranks), "[MASK]": len(vocab.ranks) + 1}
    assert stats["ranks_short"] == 398 - len(vocab.ranks)
    assert load_encoding(out).decode(load_encoding(out).encode_ordinary("TATACAT")) == "TATACAT"


def test_same_config_gives_identical_files(tmp_path, docs_dir):
    first, _ = train(tmp_path, docs_dir, name="a", vocab_size=600, max_train_chars=500_000)
    second, _ = train(tmp_path, docs_dir, name="b", vocab_size=600, max_train_chars=500_000)
    for name in (RANKS_FILE, CONFIG_FILE, HF_FILE):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_training_caps_and_source_filter(tmp_path, docs_dir, corpus):
    _, capped = train(tmp_path, docs_dir, name="capped", vocab_size=300, max_train_chars=50_000, max_doc_chars=100)
    heldout = select_heldout(document_files(docs_dir), 200)
    chars = docs = 0
    for doc in (d for d in corpus if d.text and d.id not in heldout):
        chars, docs = chars + min(len(doc.text), 100, 50_000 - chars), docs + 1
        if chars >= 50_000:
            break
    assert capped["train_chars"] == chars == 50_000
    assert capped["train_docs"] == docs
    _, wiki = train(tmp_path, docs_dir, name="wiki", vocab_size=300, sources=["wikitext"], heldout_docs=0)
    wikitext = [doc for doc in corpus if doc.source == "wikitext"]
    assert wiki["train_docs"] == len(wikitext)
    assert wiki["train_chars"] == sum(min(len(doc.text), 10_000) for doc in wikitext)
    with pytest.raises(StageError, match="sources=\\['nope'\\]"):
        train(tmp_path, docs_dir, name="none", vocab_size=300, sources=["nope"])
    # a misspelt source beside a real one is named, not silently trained without
    with pytest.raises(StageError, match="names 'wikitxt', which no document has; the documents' sources are: "
                                         "cc_warc, ccnet, shakespeare, wget_warc, wikitext"):
        train(tmp_path, docs_dir, name="typo", vocab_size=300, sources=["wikitext", "wikitxt"])


@pytest.mark.parametrize("fields, message", [
    ({"vocab_size": 256}, "vocab_size=256 is smaller than the 256 byte tokens plus 1 special tokens = 257"),
    ({"vocab_size": 260, "special_tokens": BERT_SPECIALS}, "vocab_size=260 is smaller"),
    ({"vocab_size": 2**32 + 1}, "vocab_size=4294967297 exceeds 2\\*\\*32"),
    ({"special_tokens": ["[PAD]", "[PAD]"]}, "special_tokens: duplicate"),
    ({"pattern": "(unclosed"}, "pattern is not a valid split regex"),
    ({"train_fraction": 0}, "train_fraction"),
    ({"vocab_sise": 1000}, "vocab_sise"),
])
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValidationError, match=message):
        TokenizerConfig(**fields)


def test_smallest_vocab_is_bytes_plus_specials(tmp_path, docs_dir):
    out, stats = train(tmp_path, docs_dir, vocab_size=257, heldout_docs=10, max_train_chars=10_000)
    assert stats["vocab_size"] == 257 and stats["n_ranks"] == 256
    assert stats["bytes_per_token"] == pytest.approx(1.0)


def test_pretrained_name_not_cached_fails_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    started = time.monotonic()
    with pytest.raises(StageError, match="pretrained='gpt2'.*not in the tiktoken cache.*TIKTOKEN_CACHE_DIR"):
        run(TokenizerConfig(pretrained="gpt2"), stage_context(tmp_path, "tokenizer", {}))
    assert time.monotonic() - started < 5        # no download was attempted
    with pytest.raises(StageError, match="cl100k_base.tiktoken"):
        run(TokenizerConfig(pretrained="cl100k_base"), stage_context(tmp_path, "tokenizer", {}, "cl100k"))


def test_pretrained_directory_and_rank_file_reproduce_the_vocabulary(tmp_path, trained, docs_dir):
    source, _ = trained
    reused, stats = train(tmp_path, docs_dir, name="reused", pretrained=str(source),
                          special_tokens=["<|endoftext|>", "[MASK]", "<|new|>"])
    original, again = load_encoding(source), load_encoding(reused)
    text = HARD_STRINGS[0] + HARD_STRINGS[3]
    assert again.encode_ordinary(text) == original.encode_ordinary(text)
    specials = read_vocabulary(reused).special_tokens
    assert specials["[MASK]"] == original.encode_single_token("[MASK]")
    assert specials["<|new|>"] == original.max_token_value + 1
    assert stats["train_chars"] == 0 and stats["heldout_docs"] == 0    # a fixed tokenizer reads no documents

    rank_file, _ = train(tmp_path, docs_dir, name="rankfile", pretrained=str(source / RANKS_FILE))
    from_ranks = load_encoding(rank_file)
    assert from_ranks.encode_ordinary(text) == original.encode_ordinary(text)
    assert read_vocabulary(rank_file).special_tokens == {"<|endoftext|>": read_vocabulary(source).vocab_size - 6}


def test_pretrained_path_content_enters_the_fingerprint(tmp_path, trained):
    source, _ = trained
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (RANKS_FILE, CONFIG_FILE):
        (copy / name).write_bytes((source / name).read_bytes())
    before = external_inputs(TokenizerConfig(pretrained=str(copy)))
    config = json.loads((copy / CONFIG_FILE).read_text())
    config["pattern"] = r"\s+|\S+"
    (copy / CONFIG_FILE).write_text(json.dumps(config))
    assert external_inputs(TokenizerConfig(pretrained=str(copy))) != before
    assert external_inputs(TokenizerConfig(pretrained="gpt2")) == {}


def test_bad_tokenizer_files_name_file_and_line(tmp_path, trained):
    source, _ = trained
    broken = tmp_path / "broken"
    broken.mkdir()
    lines = (source / RANKS_FILE).read_bytes().splitlines()
    (broken / RANKS_FILE).write_bytes(b"\n".join([*lines[:5], b"not-base64!! x", *lines[6:]]) + b"\n")
    (broken / CONFIG_FILE).write_bytes((source / CONFIG_FILE).read_bytes())
    with pytest.raises(StageError, match=f"{RANKS_FILE}:6: expected"):
        load_encoding(broken)
    (broken / CONFIG_FILE).write_text(json.dumps({"pattern": "x", "special_tokens": {}}))
    with pytest.raises(StageError, match=f"{CONFIG_FILE}: field 'vocab_size': Field required; field 'n_ranks'"):
        load_encoding(broken)
    with pytest.raises(StageError, match="neither a tiktoken name"):
        run(TokenizerConfig(pretrained=str(tmp_path / "nowhere")), stage_context(tmp_path, "tokenizer", {}, "x"))


def test_bad_document_input_is_named(tmp_path, docs_dir):
    bad = tmp_path / "bad_docs"
    bad.mkdir()
    good = sorted(docs_dir.glob("*.parquet"))[0]
    (bad / "part-00000.parquet").write_bytes(good.read_bytes())
    (bad / "part-00001.parquet").write_bytes(good.read_bytes()[: 1000])
    with pytest.raises(StageError, match="part-00001.parquet: not a readable Parquet file"):
        train(tmp_path, bad)
    with pytest.raises(StageError, match="needs the upstream input 'documents'"):
        run(TokenizerConfig(), stage_context(tmp_path, "tokenizer", {}, "noinput"))
    assert pq.ParquetFile(bad / "part-00000.parquet").metadata.num_rows > 0
    nulls = tmp_path / "null_docs"
    nulls.mkdir()
    pq.write_table(pa.table({"id": ["a", None], "text": ["x", "y"], "source": ["s", "s"]}), nulls / "p.parquet")
    with pytest.raises(StageError, match=r"null_docs/p.parquet: row 1: field 'id' is null"):
        train(tmp_path, nulls, name="nulls")


def test_onig_pattern_keeps_gpt4_number_chunks():
    assert onig_pattern(r"\p{N}{1,3}+|[a-z]{2,}+") == r"(?>\p{N}{1,3})|(?>[a-z]{2,})"
    with pytest.raises(ValueError, match="possessive"):
        onig_pattern(r"(ab){2}+")


def test_pattern_that_drops_text_or_cannot_be_exported_is_a_stage_error(tmp_path, docs_dir):
    small = {"vocab_size": 300, "heldout_docs": 5, "max_train_chars": 20_000}
    with pytest.raises(StageError, match=r"pattern .*w\+.* does not cover all characters"):
        train(tmp_path, docs_dir, name="words", pattern=r"\w+", **small)
    # what tokenizer.json cannot express is refused with the recipe, before any training
    with pytest.raises(ValidationError, match="pattern.*possessive"):
        TokenizerConfig(pattern=r"(?:ab){2}+|[\s\S]", **small)
    with pytest.raises(ValidationError, match=r"pattern .*\(\?s:\.\).* cannot be exported to HF tokenizers"):
        TokenizerConfig(pattern=r"\w+|(?s:.)", **small)      # fine for tiktoken, not for Oniguruma


def test_a_pretrained_pattern_hf_cannot_compile_is_a_stage_error(tmp_path, trained):
    source, _ = trained
    reused = tmp_path / "reused"
    reused.mkdir()
    (reused / RANKS_FILE).write_bytes((source / RANKS_FILE).read_bytes())
    config = json.loads((source / CONFIG_FILE).read_text())
    (reused / CONFIG_FILE).write_text(json.dumps({**config, "pattern": r"\w+|(?s:.)"}))
    with pytest.raises(StageError, match="cannot export tokenizer.json: pattern .* Oniguruma"):
        run(TokenizerConfig(pretrained=str(reused)), stage_context(tmp_path, "tokenizer", {}))


def test_a_hugging_face_tokenizer_folder_is_named_as_such(tmp_path, trained):
    source, _ = trained
    hf_folder = tmp_path / "hf_folder"       # what `save_pretrained` writes: no rank file, HF's own config
    hf_folder.mkdir()
    (hf_folder / HF_FILE).write_bytes((source / HF_FILE).read_bytes())
    (hf_folder / CONFIG_FILE).write_text(json.dumps({"model_max_length": 1024, "tokenizer_class": "GPT2Tokenizer"}))
    with pytest.raises(StageError, match=f"hf_folder/{RANKS_FILE}: missing.*Hugging Face tokenizer folder"):
        run(TokenizerConfig(pretrained=str(hf_folder)), stage_context(tmp_path, "tokenizer", {}))


def test_a_rank_file_without_every_byte_is_refused_naming_it(tmp_path, trained):
    source, _ = trained
    lines = (source / RANKS_FILE).read_bytes().splitlines()
    rank_file = tmp_path / "partial.tiktoken"
    rank_file.write_bytes(b"\n".join(line for line in lines if line.split()[0] != b"YQ==") + b"\n")   # no "a"
    # tiktoken itself would panic ("no entry found for key") on the first text holding an "a"
    with pytest.raises(StageError, match=r"partial.tiktoken: 1 of the 256 single-byte tokens have no rank \(0x61\)"):
        run(TokenizerConfig(pretrained=str(rank_file)), stage_context(tmp_path, "tokenizer", {}))


# --- a pretrained tokenizer: every field changes the output or is rejected ----------------------------

@pytest.mark.parametrize("field, value", [
    ("vocab_size", 4096), ("max_train_chars", 1000), ("sources", ["wiki"]), ("train_fraction", 0.5),
    ("pattern", r"\s+|\S+"),
])
def test_a_training_field_set_beside_pretrained_is_rejected_naming_it(field, value):
    with pytest.raises(ValidationError, match=f"{field} is unused when pretrained='gpt2' is set"):
        TokenizerConfig(pretrained="gpt2", **{field: value})


def test_pretrained_fingerprint_holds_only_what_changes_the_output(tmp_path, trained):
    source, _ = trained
    named = TokenizerConfig(pretrained="gpt2")
    assert set(named.output_fields()) == {"pretrained", "from_recipe", "special_tokens"}
    # the split pattern is used only for a bare rank file, so there it is a knob and enters the fingerprint
    rank_file = TokenizerConfig(pretrained=str(source / RANKS_FILE), pattern=r"\s+|\S+")
    assert rank_file.output_fields()["pattern"] == r"\s+|\S+"
    assert "pattern" not in TokenizerConfig(pretrained=str(source)).output_fields()   # a directory brings its own
    # a fixed tokenizer reads no documents (every data variant shares it): the held-out fields are rejected
    with pytest.raises(ValidationError, match="heldout_docs, max_doc_chars are unused"):
        TokenizerConfig(pretrained="gpt2", heldout_docs=10, max_doc_chars=50)
    # a full dump (Prefect parameters, _SUCCESS.json) validates again to the same fingerprint
    assert TokenizerConfig(**named.model_dump()).output_fields() == named.output_fields()
    assert set(TokenizerConfig().output_fields()) == set(TokenizerConfig.model_fields)   # training uses them all
    # from_recipe: that recipe's tokenizer decides everything, so the fingerprint is the name alone
    assert TokenizerConfig(from_recipe="configs/demo.yaml").output_fields() == {"from_recipe": "configs/demo.yaml"}
    with pytest.raises(ValidationError, match="vocab_size is unused when from_recipe"):
        TokenizerConfig(from_recipe="configs/demo.yaml", vocab_size=300)


def test_a_fixed_tokenizer_reads_no_documents(tmp_path, trained, docs_dir):
    """Handed documents anyway, a pretrained tokenizer ignores them: its output is the same for every variant."""
    source, _ = trained
    out, stats = train(tmp_path, docs_dir, name="fixed", pretrained=str(source))
    assert stats["heldout_docs"] == 0 and stats["train_docs"] == 0
    empty = tmp_path / "none"
    empty.mkdir()
    again, _ = train(tmp_path, empty, name="fixed-again", pretrained=str(source))
    assert [(p.name, p.read_bytes()) for p in sorted(out.iterdir())] == \
        [(p.name, p.read_bytes()) for p in sorted(again.iterdir())]


# --- typed tokenizer_config.json ----------------------------------------------------------------------

@pytest.mark.parametrize("change, field", [
    ({"vocab_size": "big"}, "vocab_size"),
    ({"special_tokens": ["<|endoftext|>"]}, "special_tokens"),
    ({"colour": "red"}, "colour': unknown field"),
    ({"n_ranks": 5}, "n_ranks"),
    ({"vocab_size": 10}, "vocab_size"),
    ({"pattern": "(unclosed"}, "pattern' is not a valid split regex"),
])
def test_a_wrong_tokenizer_config_fails_naming_the_field(tmp_path, trained, change, field):
    source, _ = trained
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / RANKS_FILE).write_bytes((source / RANKS_FILE).read_bytes())
    (broken / CONFIG_FILE).write_text(json.dumps({**json.loads((source / CONFIG_FILE).read_text()), **change}))
    with pytest.raises(StageError, match=f"{CONFIG_FILE}: .*field '{field}"):
        read_vocabulary(broken)


def test_tokenizer_config_is_the_typed_file(trained):
    out, _ = trained
    config = TokenizerFile.read(out / CONFIG_FILE)
    assert config.n_ranks == len(read_vocabulary(out).ranks) and config.origin == "rustbpe"


# --- an upstream stage that kept nothing ---------------------------------------------------------------

def test_training_on_zero_documents_fails_in_one_line_and_pretrained_mode_accepts_them(tmp_path, trained):
    empty = tmp_path / "no_docs"
    empty.mkdir()
    write_documents(tmp_path / "zero_rows", [])     # a writer that got nothing leaves no file
    for docs in (empty, tmp_path / "zero_rows"):
        with pytest.raises(StageError, match=r"^tokenizer cannot train: no documents left: [^\n]*$"):
            train(tmp_path, docs, name=f"train-{docs.name}")
    source, _ = trained
    out, stats = train(tmp_path, empty, name="reuse", pretrained=str(source))
    assert stats["heldout_docs"] == 0 and stats["train_docs"] == 0
    assert read_vocabulary(out).ranks == read_vocabulary(source).ranks
