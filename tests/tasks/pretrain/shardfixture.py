"""Token shards in the shard stage's exact format, written from real text with a byte-level vocabulary.

Token ids 0..255 are the UTF-8 bytes; the special tokens follow. The tokenizer directory written
here (a tiktoken rank file plus `tokenizer_config.json`) decodes the same ids.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.formats import ShardEntry, ShardManifest, TokenizerFile

REPO_ROOT = Path(__file__).resolve().parents[3]

SPECIALS = {"<|endoftext|>": 256, "[CLS]": 257, "[SEP]": 258, "[MASK]": 259, "[PAD]": 260, "[UNK]": 261}
VOCAB_SIZE = 262
BYTE_PATTERN = r"[\s\S]"                      # every character its own piece: bytes stay bytes


def shakespeare_docs(data: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(doc id, text): tiny Shakespeare cut into speeches at blank lines."""
    text = (data / "raw" / "tinyshakespeare_input.txt").read_text()
    speeches = [s.strip() + "\n" for s in text.split("\n\n") if s.strip()]
    return [(f"shakespeare-{i:05d}", s) for i, s in enumerate(speeches[:limit])]


def wikitext_docs(data: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(doc id, text): WikiText-2 test cut into articles at its ` = Title = ` headings."""
    text = (data / "raw" / "wikitext-2_test.txt").read_text()
    articles = [a.strip() for a in re.split(r"\n(?= = [^=].* = \n)", text) if a.strip()]
    return [(f"wikitext-{i:04d}", a) for i, a in enumerate(articles[:limit])]


def split_of(doc_id: str, val_fraction: float) -> str:
    digest = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return "val" if digest / 2**64 < val_fraction else "train"


def write_shards(out: Path, docs: list[tuple[str, str]], n_files: int = 2, row_group_rows: int = 64,
                 val_fraction: float = 0.1, source: str = "fixture", poison: set[str] = frozenset()) -> Path:
    """Writes `manifest.json` and `shards/shard-0000N.parquet` under `out`; returns `out`.

    Documents whose id is in `poison` get one token id past the vocabulary (what a shard written
    with another tokenizer would hold).
    """
    (out / "shards").mkdir(parents=True, exist_ok=True)
    rows = [{"doc_id": doc_id, "source": source, "split": split_of(doc_id, val_fraction),
             "tokens": list(text.encode("utf-8")) + ([VOCAB_SIZE + 38] if doc_id in poison else [])}
            for doc_id, text in docs]
    schema = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("split", pa.string()),
                        ("tokens", pa.list_(pa.uint16()))])
    entries = []
    for index in range(n_files):
        part = rows[index::n_files]
        path = f"shards/shard-{index:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(part, schema=schema), out / path, compression="zstd",
                       row_group_size=row_group_rows)
        entries.append(_entry(path, part))
    _write_manifest(out, entries, val_fraction, source)
    return out


def _entry(path: str, rows: list[dict]) -> dict:
    train = sum(len(r["tokens"]) for r in rows if r["split"] == "train")
    val = sum(len(r["tokens"]) for r in rows if r["split"] == "val")
    return {"path": path, "rows": len(rows), "tokens": train + val, "tokens_train": train, "tokens_val": val}


def _write_manifest(out: Path, entries: list[dict], val_fraction: float, source: str) -> None:
    """A `storage.formats.ShardManifest`, as the shard stage writes it."""
    train, val = sum(e["tokens_train"] for e in entries), sum(e["tokens_val"] for e in entries)
    ShardManifest(vocab_size=VOCAB_SIZE, token_dtype="uint16", eot_token="<|endoftext|>",
                  eot_id=SPECIALS["<|endoftext|>"], special_tokens=dict(SPECIALS), val_fraction=val_fraction,
                  split_rule="sha256(doc_id) < val_fraction (shardfixture.split_of)", max_tokens_per_doc=None,
                  overlong="split", split_doc_id_format="<doc_id>#<part>",
                  shards=[ShardEntry(**e) for e in entries], tokens_by_source={source: {"train": train, "val": val}},
                  total_tokens=train + val).write(out / "manifest.json")


def write_tokenizer(out: Path) -> Path:
    """A byte-level tokenizer directory in the tokenizer stage's format."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [base64.b64encode(bytes([i])).decode() + f" {i}" for i in range(256)]
    (out / "tokenizer.tiktoken").write_text("\n".join(lines) + "\n")
    TokenizerFile(pattern=BYTE_PATTERN, special_tokens=SPECIALS, vocab_size=VOCAB_SIZE, n_ranks=256,
                  origin="byte-level test fixture").write(out / "tokenizer_config.json")
    return out


def nano_config(**overrides: object) -> dict:
    """A gpt-nano recipe that trains in seconds on a CPU (fp32, so runs compare bit for bit)."""
    config = {"model": {"preset": "gpt-nano"}, "batch_tokens": 2048, "micro_batch": 8, "max_steps": 20,
              "nproc_per_node": 1, "precision": "fp32", "log_every": 1, "eval_every": 10, "eval_batches": 2,
              "checkpoint_every": 10, "keep_last": 2, "optim": {"lr": 3e-3, "warmup_steps": 3},
              "progress": False}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def stage_context(root: Path, shards: Path, tokenizer: Path | None = None, **extra: object):
    """A StageContext the way the orchestration builds one: output and scratch under `root`."""
    from storage.stage import StageContext

    (root / "output").mkdir(parents=True, exist_ok=True)
    inputs = {"shard": shards, **({"tokenizer": tokenizer} if tokenizer else {})}
    return StageContext(stage="pretrain", fingerprint="test", output=root / "output", scratch=root / "scratch",
                        inputs=inputs, workspace=root, seed=0, **extra)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
