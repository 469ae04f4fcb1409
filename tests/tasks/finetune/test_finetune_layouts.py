"""Token layouts of both families (GPT-1's input transformations, BERT's pairs), QA windows and offsets,
tagging chunks, and the task model's pieces: random init, task-token rows, saving and loading."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

from storage.formats import ModelSpec
from tasks.datasets.conll import TaggedSentence
from tasks.datasets.squad import SquadAnswer, SquadExample
from tasks.finetune.checkpoint import build_task_model, encoder_weights, load_finetuned, save_finetuned
from tasks.finetune.data import BadRowCounter, TaskData, TextExample
from tasks.finetune.encode import IGNORE, BertLayout, GptLayout, Specials, token_spans
from tasks.finetune.features import Features
from tasks.finetune.model import HeadSpec
from tasks.finetune.prepare import Preparer, QaSettings, window_starts
from tasks.models import GPT, build_model
from tasks.models.files import write_model

GPT_IDS = Specials(start=300, delim=301, extract=302, pad=256)        # start/delim/extract: rows past the vocab
BERT_IDS = Specials(start=257, delim=258, extract=258, pad=260)       # [CLS] [SEP] [SEP] [PAD]
BYTES = tiktoken.Encoding("bytes", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                          special_tokens={})


def test_gpt1_transformations():
    gpt = GptLayout(GPT_IDS, 16)
    assert gpt.single([1, 2, 3]).sequences == [[300, 1, 2, 3, 302]]
    assert gpt.pair([1, 2], [7, 8]).sequences == [[300, 1, 2, 301, 7, 8, 302]]           # premise delim hypothesis
    assert gpt.similarity([1, 2], [7]).sequences == [[300, 1, 2, 301, 7, 302], [300, 7, 301, 1, 2, 302]]  # both orders
    choices = gpt.choices([([5, 6], [7]), ([5, 6], [8, 9])])
    assert choices.sequences == [[300, 5, 6, 301, 7, 302], [300, 5, 6, 301, 8, 9, 302]]  # one sequence per answer
    assert gpt.single([1, 2, 3]).segments is None                                         # GPT has no segments
    item, first_context, null = gpt.qa([4, 5], [9, 9, 9])
    assert item.sequences == [[300, 4, 5, 301, 9, 9, 9, 302]] and (first_context, null) == (4, 7)   # context last


def test_bert_layouts_and_segments():
    bert = BertLayout(BERT_IDS, 16)
    single = bert.single([1, 2])
    assert single.sequences == [[257, 1, 2, 258]] and single.segments == [[0, 0, 0, 0]]
    pair = bert.pair([1, 2], [7, 8, 9])
    assert pair.sequences == [[257, 1, 2, 258, 7, 8, 9, 258]] and pair.segments == [[0, 0, 0, 0, 1, 1, 1, 1]]
    assert bert.similarity([1], [2]).sequences == bert.pair([1], [2]).sequences      # BERT reads a pair once
    item, first_context, null = bert.qa([4, 5], [9, 9])
    assert item.segments == [[0, 0, 0, 0, 1, 1, 1]] and (first_context, null) == (4, 0)   # [CLS] = no answer


def test_truncation_cuts_the_longer_text_first():
    gpt = GptLayout(GPT_IDS, 8)
    cut = gpt.pair(list(range(10)), [50, 51])
    assert cut.truncated and cut.sequences == [[300, 0, 1, 2, 301, 50, 51, 302]]
    assert len(BertLayout(BERT_IDS, 8).single(list(range(20))).sequences[0]) == 8


def test_token_spans_trim_spaces_and_keep_multibyte_characters():
    text = "Héllo  wörld"
    spans = token_spans(text, BYTES.encode_ordinary(text), BYTES)
    assert spans[1] == spans[2] == (1, 2)                 # é is two byte tokens, both on the character
    assert text[spans[8][0]:spans[-1][1]] == "wörld" and spans[6] == (5, 6)     # a space alone keeps its span


def test_qa_windows_keep_offsets_and_label_the_answer_in_each_window():
    context = "abcdefghijklmnopqrstuvwxyz"
    example = SquadExample("q1", "t", context, "q?", (SquadAnswer("mno", 12),), False)
    data = TaskData("squad", "squad", "qa", [], ("exact", "f1"), [example], {})
    preparer = Preparer(data, GptLayout(GPT_IDS, 16), BYTES, QaSettings(max_query_length=4, doc_stride=5))
    prepared = preparer.prepare([example], True, BadRowCounter(), "train")
    # 16 tokens - 2 question - 3 added = 11 context tokens per window, windows 5 apart: 0, 5, 10, 15
    assert window_starts(26, 11, 5) == [0, 5, 10, 15]
    starts = [m.offsets[4][0] for m in prepared.meta]
    assert starts == [0, 5, 10, 15]
    labels = prepared.features.labels.tolist()
    for meta, (start, end) in zip(prepared.meta, labels):
        if start == meta.null_index:
            assert end == meta.null_index                                   # the answer is not in this window
        else:
            assert context[meta.offsets[start][0]:meta.offsets[end][1]] == "mno"
    assert sum(start != m.null_index for m, (start, _) in zip(prepared.meta, labels)) == 2   # windows 5 and 10


def test_a_misplaced_answer_start_is_counted_and_not_trained_on():
    good = SquadExample("a", "t", "one two three", "q?", (SquadAnswer("two", 4),), False)
    bad = SquadExample("b", "t", "one two three", "q?", (SquadAnswer("two", 5),), False)
    data = TaskData("squad", "squad", "qa", [], ("exact", "f1"), [good, bad], {})
    counter = BadRowCounter()
    prepared = Preparer(data, BertLayout(BERT_IDS, 32), BYTES, QaSettings(8, 16)).prepare([good, bad], True,
                                                                                            counter, "f.json")
    assert [e.id for e in prepared.examples] == ["a"]
    assert [(r.reason, r.path) for r in counter.rows] == [("answer_start_mismatch", "f.json")]
    assert "question b" in counter.rows[0].detail
    evaluated = Preparer(data, BertLayout(BERT_IDS, 32), BYTES, QaSettings(8, 16)).prepare([good, bad], False,
                                                                                             BadRowCounter(), "x")
    assert [e.id for e in evaluated.examples] == ["a", "b"]                 # every question is still predicted


def test_tagging_labels_the_first_piece_of_each_word_and_chunks_long_sentences():
    sentence = TaggedSentence("0", 1, ("EU", "rejects", "it"), ("B-ORG", "O", "O"))
    data = TaskData("ner", "conll", "tagging", ["O", "B-ORG"], ("f1",), [sentence], {})
    prepared = Preparer(data, BertLayout(BERT_IDS, 8), BYTES).prepare([sentence], True, BadRowCounter(), "x")
    # pieces: "EU" (2), " rejects" (8), " it" (3); 6 tokens fit beside [CLS] [SEP]: one chunk per word
    assert [(m.first_word, m.positions) for m in prepared.meta] == [(0, [1]), (1, [1]), (2, [1])]
    tags = prepared.features.batch([0], BERT_IDS.pad)["labels"][0].tolist()
    assert tags[:4] == [IGNORE, 1, IGNORE, IGNORE]        # B-ORG on "E", nothing on "U" and the specials


def test_features_round_trip_and_pad_per_batch(tmp_path):
    examples = [TextExample(str(i), "x" * (i + 1), None, i % 2) for i in range(5)]
    data = TaskData("t", "fpb", "single", [0, 1], ("accuracy",), examples, {})
    features = Preparer(data, GptLayout(GPT_IDS, 16), BYTES).prepare(examples, True, BadRowCounter(), "x").features
    again = Features.load(features.save(tmp_path / "f.npz"))
    batch = again.batch([4, 0], GPT_IDS.pad)
    assert batch["input_ids"].shape == (2, 1, 7) and batch["labels"].tolist() == [0, 0]
    assert batch["attention_mask"][1, 0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert np.array_equal(again.subset([3]).batch([0], 0)["input_ids"], features.batch([3], 0)["input_ids"])


# ---- the task model ---------------------------------------------------------------------------

SPEC = ModelSpec(arch="gpt", n_layer=2, n_head=2, d_model=32, d_mlp=64, seq_len=32, vocab_size=262,
                 padded_vocab_size=384, special_tokens={"<|endoftext|>": 256})


def head(kind: str = "classify", outputs: int = 2) -> HeadSpec:
    return HeadSpec(task="t", kind=kind, family="gpt", n_outputs=outputs, labels=[0, 1], form="single", max_length=32,
                    lm_weight=0.5, task_tokens={"start": 262, "delim": 263, "extract": 264}, pad_id=256,
                    init="pretrained")


@pytest.fixture
def pretrained_dir(tmp_path: Path) -> Path:
    (tmp_path / "pre").mkdir()
    torch.manual_seed(0)
    write_model(tmp_path / "pre", build_model(SPEC).state_dict(), SPEC)
    return tmp_path / "pre"


def test_random_init_ignores_the_pretrained_weights(pretrained_dir: Path, tmp_path: Path):
    torch.manual_seed(5)
    first = build_task_model(SPEC, head(), None, 0.1, 0).state_dict()
    other = tmp_path / "other"
    other.mkdir()
    torch.manual_seed(99)
    write_model(other, build_model(SPEC).state_dict(), SPEC)                 # different pretrained weights
    torch.manual_seed(5)
    second = build_task_model(SPEC, head(), None, 0.1, 0).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(5)
    loaded = build_task_model(SPEC, head(), pretrained_dir, 0.1, 0).state_dict()
    assert not torch.equal(loaded["encoder.blocks.0.attn.qkv.weight"], first["encoder.blocks.0.attn.qkv.weight"])


def test_task_tokens_get_fresh_rows_on_the_scale_of_the_trained_ones(pretrained_dir: Path):
    torch.manual_seed(1)
    model = build_task_model(SPEC, head(), pretrained_dir, 0.1, 128)      # 128 more rows
    table = model.encoder.wte.weight.detach()
    from tasks.models.pretrained import read_weights

    trained = read_weights(pretrained_dir / "model.safetensors", "cpu")["wte.weight"]
    assert table.shape == (512, 32) and torch.equal(table[:262], trained[:262])
    assert torch.equal(table[265:384], trained[265:])                      # other padding rows untouched
    mean = trained[:262].mean(dim=0)
    assert all((table[i] - mean).norm() < 0.3 for i in (262, 263, 264))


def test_finetuned_model_saves_and_loads_exactly(pretrained_dir: Path, tmp_path: Path):
    torch.manual_seed(2)
    model = build_task_model(SPEC, head("span", 2), pretrained_dir, 0.0, 0).eval()
    save_finetuned(tmp_path / "ft", model, SPEC, head("span", 2))
    loaded, spec = load_finetuned(tmp_path / "ft")
    ids = torch.randint(0, 262, (2, 1, 12))
    mask = torch.ones_like(ids)
    assert spec == SPEC and loaded.head_spec == head("span", 2)
    assert torch.equal(loaded(ids, mask).logits, model(ids, mask).logits)
    assert set(loaded.state_dict()) >= {"encoder.wte.weight", "head.weight"}
    lm_spec, weights = encoder_weights(tmp_path / "ft")
    language_model = GPT(lm_spec)
    language_model.load_state_dict(weights, strict=True)                  # what export and generate can load
    assert torch.equal(language_model.wte.weight, model.encoder.wte.weight)


def test_heads_give_one_score_per_answer_and_one_pair_per_token(pretrained_dir: Path):
    torch.manual_seed(3)
    ids, mask = torch.randint(0, 262, (2, 3, 10)), torch.ones(2, 3, 10, dtype=torch.long)
    choice = build_task_model(SPEC, head("choice", 1), pretrained_dir, 0.0, 0)
    out = choice(ids, mask, labels=torch.tensor([2, 0]))
    assert out.logits.shape == (2, 3) and out.task_loss.item() > 0         # softmax over the answers
    assert out.loss.item() > out.task_loss.item()                          # + 0.5 * the LM loss (GPT-1)
    span = build_task_model(SPEC, head("span", 2), pretrained_dir, 0.0, 0)
    padded = mask[:, :1].clone()
    padded[1, 0, 6:] = 0
    logits = span(ids[:, :1], padded).logits
    assert logits.shape == (2, 10, 2) and (logits[1, 6:] < -1e3).all()     # padding never starts or ends a span
