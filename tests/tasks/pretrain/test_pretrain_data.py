"""The streaming loaders over real token shards: rank disjointness, packing, determinism, resuming."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import shardfixture as sf

from tasks.pretrain.data import (IS_NEXT, NOT_NEXT, LoaderState, PairIds, PairStream, ShardDataError, TokenStream,
                                 gpt_batches, rank_row_groups, read_documents, read_manifest, shard_paths,
                                 split_row_groups)
from tasks.training.batches import Prefetcher

EOT = sf.SPECIALS["<|endoftext|>"]
IDS = PairIds(sf.SPECIALS["[CLS]"], sf.SPECIALS["[SEP]"], sf.SPECIALS["[PAD]"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    docs = sf.shakespeare_docs(shared_data, 600)
    return sf.write_shards(tmp_path_factory.mktemp("shards"), docs, n_files=2, row_group_rows=32)


def groups(shards: Path, split: str = "train"):
    return split_row_groups(shard_paths(shards, read_manifest(shards)), split)


def split_rows(shards: Path, split: str) -> list[list[int]]:
    table = pq.read_table(shards / "shards", columns=["split", "tokens"]).to_pylist()
    return [row["tokens"] for row in table if row["split"] == split]


def one_epoch(stream: TokenStream, chunk: int = 997) -> np.ndarray:
    taken = []
    while stream.state.epoch == 0:
        taken.append(stream.take(chunk))
    return np.concatenate(taken)


def test_row_groups_are_dealt_disjointly_and_reshuffled_each_epoch() -> None:
    for epoch in range(3):
        per_rank = [rank_row_groups(20, epoch, seed=5, rank=r, world=3) for r in range(3)]
        flat = [g for mine in per_rank for g in mine]
        assert sorted(flat) == list(range(20))            # every row group once, no rank shares one
    assert rank_row_groups(20, 0, 5, 0, 3) != rank_row_groups(20, 1, 5, 0, 3)
    assert rank_row_groups(20, 0, 5, 0, 3) == rank_row_groups(20, 0, 5, 0, 3)


def test_two_ranks_together_read_every_training_token_once_per_epoch(shards: Path) -> None:
    train = groups(shards)
    assert len(train) >= 10 and len(groups(shards, "val")) >= 1
    streams = [TokenStream(train, "train", r, 2, 7, sf.VOCAB_SIZE, eot_id=EOT) for r in range(2)]
    # Both epochs-worth, minus the overshoot into epoch 1 of the last chunk.
    read = [one_epoch(s) for s in streams]
    docs = [d for d in split_rows(shards, "train") if d]
    expected = np.sort(np.concatenate([np.array(d + [EOT]) for d in docs]))
    got = np.concatenate([r[: len(r) - s.state.offset] for r, s in zip(read, streams)])
    assert np.array_equal(np.sort(got), expected)


def test_validation_stream_reads_only_val_rows(shards: Path) -> None:
    val_docs = [d for d in split_rows(shards, "val") if d]
    stream = TokenStream(groups(shards, "val"), "val", 0, 1, 0, sf.VOCAB_SIZE, eot_id=EOT, shuffle=False)
    got = stream.take(sum(len(d) + 1 for d in val_docs))
    assert np.array_equal(got, np.concatenate([np.array(d + [EOT]) for d in val_docs]))


def test_windows_pack_documents_separated_by_eot(shards: Path) -> None:
    stream = TokenStream(groups(shards), "train", 0, 1, 3, sf.VOCAB_SIZE, eot_id=EOT)
    first_group = rank_row_groups(len(groups(shards)), 0, 3, 0, 1)[0]
    values, lengths = read_documents(groups(shards)[first_group], "train", sf.VOCAB_SIZE)
    batch = next(gpt_batches(stream, micro_batch=4, seq_len=64))
    inputs, targets = batch.arrays["idx"], batch.arrays["targets"]
    assert inputs.shape == targets.shape == (4, 64) and batch.tokens == 256
    assert np.array_equal(inputs[:, 1:], targets[:, :-1])          # targets are inputs shifted by one
    windows = np.concatenate([np.concatenate([i, t[-1:]]) for i, t in zip(inputs, targets)])
    first_doc = values[: lengths[0]]
    assert np.array_equal(windows[: len(first_doc)], first_doc)
    assert windows[len(first_doc)] == EOT                         # the separator after the first document
    rest = windows[len(first_doc) + 1:]
    assert np.array_equal(rest, values[lengths[0]: lengths[0] + len(rest)])    # then the next document


def test_loader_is_deterministic_and_resumes_exactly_from_its_state(shards: Path) -> None:
    def batches(seed: int, state: LoaderState | None = None):
        stream = TokenStream(groups(shards), "train", 1, 2, seed, sf.VOCAB_SIZE, eot_id=EOT, state=state)
        return gpt_batches(stream, micro_batch=8, seq_len=64)

    first = list(itertools.islice(batches(11), 12))                # crosses several row groups
    again = list(itertools.islice(batches(11), 12))
    other = list(itertools.islice(batches(12), 12))
    assert all(np.array_equal(a.arrays["idx"], b.arrays["idx"]) for a, b in zip(first, again))
    assert not all(np.array_equal(a.arrays["idx"], b.arrays["idx"]) for a, b in zip(first, other))
    resumed = list(itertools.islice(batches(11, LoaderState(**first[4].position)), 7))
    assert all(np.array_equal(a.arrays["idx"], b.arrays["idx"]) for a, b in zip(first[5:], resumed))
    assert first[-1].position["unit"] > 0


def test_bert_pairs_are_cls_a_sep_b_sep_with_segments(shards: Path) -> None:
    stream = PairStream(groups(shards), "train", 0, 1, 0, sf.VOCAB_SIZE, ids=IDS, seq_len=64, nsp=True)
    examples = [stream.take() for _ in range(400)]
    text = b"".join(bytes(d) for d in split_rows(shards, "train"))
    labels = []
    for ids, segments, label in examples:
        real = ids[ids != IDS.pad]
        seps = np.flatnonzero(real == IDS.sep)
        assert real[0] == IDS.cls and len(seps) == 2 and seps[1] == len(real) - 1
        assert (segments[: seps[0] + 1] == 0).all() and (segments[seps[0] + 1: len(real)] == 1).all()
        assert (segments[len(real):] == 0).all() and len(ids) == 64
        first, second = bytes(real[1: seps[0]].tolist()), bytes(real[seps[0] + 1: seps[1]].tolist())
        assert first and second
        if label == IS_NEXT:
            assert first + second in text                       # B continues A in the same document
        labels.append(label)
    assert 0.4 < labels.count(NOT_NEXT) / len(labels) < 0.6
    plain = PairStream(groups(shards), "train", 0, 1, 0, sf.VOCAB_SIZE, ids=IDS, seq_len=64, nsp=False)
    assert all(plain.take()[2] == IS_NEXT for _ in range(100))


def test_a_token_outside_the_vocabulary_names_the_file_row_group_and_document(tmp_path: Path,
                                                                             shared_data: Path) -> None:
    docs = sf.shakespeare_docs(shared_data, 100)
    poisoned = next(doc_id for doc_id, _ in docs[32:] if sf.split_of(doc_id, 0.1) == "train")
    bad = sf.write_shards(tmp_path, docs, n_files=1, row_group_rows=32, poison={poisoned})
    train = groups(bad)
    with pytest.raises(ShardDataError, match=rf"shard-00000\.parquet row group 1: document '{poisoned}' "
                                             r"holds token id 300, outside the manifest's vocab_size 262"):
        for group in train:
            read_documents(group, "train", sf.VOCAB_SIZE)


def test_prefetcher_keeps_order_and_hands_errors_to_the_consumer() -> None:
    def numbers():
        yield from range(5)
        raise ValueError("row group 3 is broken")

    fetched = Prefetcher(numbers(), transform=lambda x: x * 10)
    assert [next(fetched) for _ in range(5)] == [0, 10, 20, 30, 40]
    with pytest.raises(ValueError, match="row group 3 is broken"):
        next(fetched)
