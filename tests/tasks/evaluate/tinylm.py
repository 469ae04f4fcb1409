"""A tiny GPT pretrained for real, once per test session: a rustbpe BPE, Parquet shards, `tasks.pretrain.run`.

Shared by the evaluate, export and CLI tests (`import tinylm` after putting this folder on sys.path).
The BPE (512 ids: 506 ranks and the six special tokens) is trained on WikiText-2 and tiny Shakespeare;
the shards hold the same texts in the shard stage's format; a gpt-nano (seq_len 64) trains for
`STEPS` steps under torchrun, fp32. `tiny_gpt(base)` builds it under `base` the first time and
returns the paths every later call (the build is locked, so parallel callers wait).
"""
from __future__ import annotations

import fcntl
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pretrain"))
import shardfixture as sf  # noqa: E402

from storage.formats import ShardEntry, ShardManifest  # noqa: E402

SPECIALS = ["<|endoftext|>", "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"]
VOCAB_SIZE = 512
STEPS = 60
SHARED_DATA = sf.REPO_ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class TinyLM:
    root: Path
    tokenizer: Path          # a tokenizer stage output (tiktoken ranks + tokenizer_config.json)
    shards: Path
    pretrain: Path           # a pretrain stage output (model/, checkpoints/, metrics.jsonl)


def documents() -> list[tuple[str, str]]:
    return sf.wikitext_docs(SHARED_DATA, 60) + sf.shakespeare_docs(SHARED_DATA, 600)


def write_bpe_tokenizer(out: Path, docs: list[tuple[str, str]]) -> Path:
    """A real byte-level BPE (rustbpe, GPT-4 split pattern) in the tokenizer stage's files."""
    from tasks.tokenizer.config import GPT4_PATTERN
    from tasks.tokenizer.files import save_vocabulary, with_specials
    from tasks.tokenizer.stage import train_ranks

    out.mkdir(parents=True, exist_ok=True)
    ranks = train_ranks(iter(text for _, text in docs), VOCAB_SIZE - len(SPECIALS), GPT4_PATTERN)
    save_vocabulary(with_specials(ranks, GPT4_PATTERN, SPECIALS, "rustbpe"), out)
    return out


def write_shards(out: Path, docs: list[tuple[str, str]], tokenizer: Path, val_fraction: float = 0.1) -> Path:
    """`manifest.json` and two Parquet shards, each document encoded and followed by end-of-text."""
    from tasks.tokenizer import load_encoding

    encoding = load_encoding(tokenizer)
    eot = encoding.eot_token
    ids = encoding.encode_ordinary_batch([text for _, text in docs])
    rows = [{"doc_id": doc_id, "source": "fixture", "split": sf.split_of(doc_id, val_fraction),
             "tokens": tokens + [eot]} for (doc_id, _), tokens in zip(docs, ids)]
    (out / "shards").mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("split", pa.string()),
                        ("tokens", pa.list_(pa.uint16()))])
    entries = []
    for index in range(2):
        part, path = rows[index::2], f"shards/shard-{index:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(part, schema=schema), out / path, row_group_size=32)
        entries.append(ShardEntry(path=path, rows=len(part), tokens=sum(len(r["tokens"]) for r in part),
                                  tokens_train=sum(len(r["tokens"]) for r in part if r["split"] == "train"),
                                  tokens_val=sum(len(r["tokens"]) for r in part if r["split"] == "val")))
    train, val = sum(e.tokens_train for e in entries), sum(e.tokens_val for e in entries)
    specials = {name: encoding.encode_single_token(name) for name in SPECIALS}
    ShardManifest(vocab_size=VOCAB_SIZE, token_dtype="uint16", special_tokens=specials, eot_token="<|endoftext|>",
                  eot_id=eot, eot_appended=True, val_fraction=val_fraction, split_rule="shardfixture.split_of",
                  max_tokens_per_doc=None, overlong="split", split_doc_id_format="<doc_id>#<part>", shards=entries,
                  tokens_by_source={"fixture": {"train": train, "val": val}},
                  total_tokens=train + val).write(out / "manifest.json")
    return out


def pretrain(root: Path, shards: Path, tokenizer: Path, steps: int = STEPS, **overrides: object) -> Path:
    """A real pretrain run (torchrun, one process); returns its output directory."""
    from tasks.pretrain import PretrainConfig, run

    config = sf.nano_config(max_steps=steps, eval_every=0, checkpoint_every=0, log_every=10,
                            sample={"prompts": ["The "], "max_new_tokens": 8}, **overrides)
    ctx = sf.stage_context(root, shards, tokenizer)
    run(PretrainConfig(**config), ctx)
    return ctx.output


def tiny_gpt(base: Path) -> TinyLM:
    """The session's tiny GPT under `base/tinylm-gpt`, built on the first call."""
    root = base / "tinylm-gpt"
    root.mkdir(parents=True, exist_ok=True)
    lm = TinyLM(root, root / "tokenizer", root / "shard", root / "pretrain" / "output")
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "DONE").exists():
            docs = documents()
            write_bpe_tokenizer(lm.tokenizer, docs)
            write_shards(lm.shards, docs, lm.tokenizer)
            pretrain(root / "pretrain", lm.shards, lm.tokenizer)
            (root / "DONE").write_text("ok\n")
    return lm
