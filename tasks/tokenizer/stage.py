"""The tokenizer stage: train (or reuse) a byte-level BPE and write it in tiktoken and HF formats."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import rustbpe
import tiktoken

from storage.documents import count_documents
from storage.lineage import empty_input_message
from storage.stage import StageContext, StageError, StageResult

from .config import TokenizerConfig
from .corpus import TrainingCorpus, check_sources_exist, readable_document_files, select_heldout
from .files import HF_FILE, Vocabulary, save_vocabulary, with_specials
from .hf import write_hf_tokenizer
from .pretrained import pretrained_vocabulary

log = logging.getLogger(__name__)


def run(config: TokenizerConfig, ctx: StageContext) -> StageResult:
    """Writes `tokenizer.tiktoken`, `tokenizer_config.json` and `tokenizer.json` into `ctx.output`."""
    if config.from_recipe:
        raise StageError("tokenizer.from_recipe is resolved by the planner, which runs that recipe's tokenizer "
                         "stage instead of this one (flows.plan.borrowed_stage)")
    result = StageResult()
    vocab = pretrained_vocabulary(config) if config.pretrained else None
    # A fixed tokenizer reads no documents (the planner gives it none), so every data variant shares it.
    files = _document_files(ctx, required=True) if vocab is None else []
    if vocab is None and config.sources is not None:     # a typo beside a real source: before hours of training
        check_sources_exist(f"tokenizer: sources={config.sources}", config.sources, files)
    corpus = TrainingCorpus(files, config, select_heldout(files, config.heldout_docs))
    if vocab is None:
        vocab = train_vocabulary(config, corpus, result)
    save_vocabulary(vocab, ctx.output)
    try:
        write_hf_tokenizer(vocab, ctx.output / HF_FILE)
    except ValueError as exc:   # a pattern or special token the HF format cannot express
        raise StageError(f"tokenizer: cannot export {HF_FILE}: {exc}") from None
    result.count("vocab_size", vocab.vocab_size)
    result.count("n_ranks", len(vocab.ranks))
    result.count("n_special_tokens", len(vocab.special_tokens))
    result.count("train_chars", corpus.train_chars)
    result.count("train_docs", corpus.train_docs)
    for name, value in heldout_stats(vocab, corpus.heldout_texts()).items():
        result.count(name, value)
    return result


def _document_files(ctx: StageContext, required: bool) -> list[Path]:
    if "documents" not in ctx.inputs:
        if required:
            raise StageError("tokenizer: training needs the upstream input 'documents', and none was given")
        return []
    files = readable_document_files(ctx.inputs["documents"])
    if required and count_documents(files) == 0:
        # an empty input is valid upstream; training is the first step that cannot work with it
        raise StageError(f"tokenizer cannot train: {empty_input_message(Path(ctx.inputs['documents']))}")
    return files


def train_ranks(texts: Iterator[str], n_ranks: int, pattern: str) -> dict[bytes, int]:
    """Byte-level BPE with rustbpe: 256 byte tokens, then merges until `n_ranks` (or no pair is left)."""
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(texts, n_ranks, pattern=pattern)
    return {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}


def train_vocabulary(config: TokenizerConfig, corpus: TrainingCorpus, result: StageResult) -> Vocabulary:
    """Trains on the corpus; special token ids follow the trained ranks."""
    wanted = config.vocab_size - len(config.special_tokens)
    ranks = train_ranks(corpus.texts(), wanted, config.pattern)
    if corpus.train_docs == 0:
        raise StageError(f"tokenizer: no training text left after the filters sources={config.sources} "
                         f"and train_fraction={config.train_fraction} (held-out documents are excluded)")
    if len(ranks) < wanted:
        log.warning("tokenizer: the training text allows only %d of %d ranks", len(ranks), wanted)
        result.count("ranks_short", wanted - len(ranks))
    return with_specials(ranks, config.pattern, config.special_tokens, "rustbpe")


def heldout_stats(vocab: Vocabulary, texts: list[str]) -> dict[str, float]:
    """Compression (UTF-8 bytes per token) and the share of ranks used, on held-out documents.

    Also checks the round trip: a split pattern that skips characters would lose text.
    """
    if not texts:
        return {"heldout_docs": 0}
    encoding = vocab.encoding()
    ids = encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
    for text, tokens in zip(texts, ids):
        _check_round_trip(encoding, vocab.pattern, text, tokens)
    n_tokens = sum(len(tokens) for tokens in ids)
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    used = set().union(*ids) - set(vocab.special_tokens.values())
    return {"heldout_docs": len(texts), "heldout_tokens": n_tokens,
            "bytes_per_token": n_bytes / max(n_tokens, 1), "vocab_used_fraction": len(used) / len(vocab.ranks)}


def _check_round_trip(encoding: tiktoken.Encoding, pattern: str, text: str, tokens: list[int]) -> None:
    if encoding.decode_bytes(tokens) != text.encode("utf-8"):
        raise StageError(f"tokenizer: pattern {pattern!r} does not cover all characters: "
                         f"decode(encode(text)) differs for the held-out text starting {text[:60]!r}")
