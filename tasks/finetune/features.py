"""Encoded examples as flat numpy arrays: what the stage hands the training workers (one `.npz` per run).

A task's examples become features (a QA question: one per context window; a long sentence to tag:
one per chunk of words). Each feature has `n_seq` token sequences of any length (1; 2 for GPT's
similarity; one per answer for multiple choice); micro-batches pad them to their longest. Labels are
a class index or a score per feature, a (start, end) token pair (QA), or one tag per token
(-100 where nothing is scored).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.finetune.encode import IGNORE, Encoded

LABEL_KINDS = ("class", "score", "span", "tags")


@dataclass
class Features:
    tokens: np.ndarray          # int32, every sequence's ids, concatenated
    lengths: np.ndarray         # int32, (features * n_seq,)
    segments: np.ndarray | None  # int8 like tokens (BERT), None for GPT
    labels: np.ndarray          # (features,) class/score, (features, 2) span, or like tokens for tags
    label_kind: str
    n_seq: int

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths) // self.n_seq

    @classmethod
    def build(cls, encoded: list[Encoded], label_kind: str) -> "Features":
        if not encoded:
            raise ValueError("no features to build")
        sequences = [seq for e in encoded for seq in e.sequences]
        tokens = np.fromiter((t for seq in sequences for t in seq), dtype=np.int32)
        lengths = np.array([len(seq) for seq in sequences], dtype=np.int32)
        segments = None if encoded[0].segments is None else \
            np.fromiter((s for e in encoded for seg in e.segments for s in seg), dtype=np.int8)
        return cls(tokens, lengths, segments, _labels(encoded, label_kind), label_kind, len(encoded[0].sequences))

    def save(self, path: Path) -> Path:
        arrays = {"tokens": self.tokens, "lengths": self.lengths, "labels": self.labels,
                  "meta": np.array([LABEL_KINDS.index(self.label_kind), self.n_seq])}
        if self.segments is not None:
            arrays["segments"] = self.segments
        np.savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> "Features":
        with np.load(path) as data:
            kind, n_seq = (int(v) for v in data["meta"])
            segments = data["segments"] if "segments" in data else None
            return cls(data["tokens"], data["lengths"], segments, data["labels"], LABEL_KINDS[kind], n_seq)

    def subset(self, indices: list[int]) -> "Features":
        """The features at `indices`, in that order."""
        seqs = [i * self.n_seq + s for i in indices for s in range(self.n_seq)]
        pieces = [slice(self.starts[q], self.starts[q] + self.lengths[q]) for q in seqs]
        take = np.concatenate([np.arange(p.start, p.stop) for p in pieces]) if pieces else np.zeros(0, np.int64)
        labels = self.labels[take] if self.label_kind == "tags" else self.labels[np.array(indices, dtype=np.int64)]
        segments = None if self.segments is None else self.segments[take]
        return Features(self.tokens[take], self.lengths[seqs], segments, labels, self.label_kind, self.n_seq)

    def max_length(self) -> int:
        return int(self.lengths.max())

    def batch(self, indices: list[int] | np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
        """input_ids, attention_mask (and segment_ids) as (batch, n_seq, longest), and the labels."""
        seqs = [i * self.n_seq + s for i in indices for s in range(self.n_seq)]
        width = int(self.lengths[seqs].max())
        shape = (len(indices), self.n_seq, width)
        ids = np.full(shape, pad_id, dtype=np.int64)
        mask = np.zeros(shape, dtype=np.int64)
        segments = np.zeros(shape, dtype=np.int64) if self.segments is not None else None
        tags = np.full(shape, IGNORE, dtype=np.int64) if self.label_kind == "tags" else None
        for row, q in enumerate(seqs):
            b, s, n, start = row // self.n_seq, row % self.n_seq, self.lengths[q], self.starts[q]
            ids[b, s, :n], mask[b, s, :n] = self.tokens[start:start + n], 1
            if segments is not None:
                segments[b, s, :n] = self.segments[start:start + n]
            if tags is not None:
                tags[b, s, :n] = self.labels[start:start + n]
        out = {"input_ids": ids, "attention_mask": mask}
        if segments is not None:
            out["segment_ids"] = segments
        out["labels"] = tags[:, 0] if tags is not None else self.labels[np.asarray(indices, dtype=np.int64)]
        return out

    def real_tokens(self, indices: list[int] | np.ndarray) -> int:
        return int(sum(self.lengths[i * self.n_seq + s] for i in indices for s in range(self.n_seq)))


def _labels(encoded: list[Encoded], kind: str) -> np.ndarray:
    if kind == "class":
        return np.array([e.label for e in encoded], dtype=np.int64)
    if kind == "score":
        return np.array([e.label for e in encoded], dtype=np.float32)
    if kind == "span":
        return np.array([e.label for e in encoded], dtype=np.int64).reshape(-1, 2)
    return np.fromiter((t for e in encoded for t in e.label), dtype=np.int64)
