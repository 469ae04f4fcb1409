"""One salted hash for every seeded choice: each use of it independent of the others, through the real steps."""
from __future__ import annotations

import hashlib
from itertools import permutations
from pathlib import Path

import pytest
from datatrove.data import Document as DtDocument

from storage.documents import Document, DocumentWriter, document_files
from storage.sampling import keep, unit_hash
from tasks.docpipe.steps import HashSampler
from tasks.ingest.stage import keep_sampled
from tasks.shard.stage import split_of
from tasks.tokenizer import TokenizerConfig
from tasks.tokenizer.corpus import TrainingCorpus, select_heldout

SEED = 1337            # one pipeline seed, as every stage of a run receives it
IDS = [f"wiki/article-{i}" for i in range(10_000)]
# Every seeded choice the pipeline makes by document id, through the stages' own code.
CHOICES = {
    "ingest sample 0.5": lambda doc_id: keep_sampled(doc_id, 0.5, SEED),
    "curate sample 0.5": lambda doc_id: HashSampler(0.5, SEED).filter(DtDocument(text="t", id=doc_id)) is True,
    "shard val 0.3": lambda doc_id: split_of(doc_id, 0.3) == "val",
}


def test_unit_hash_is_the_documented_formula():
    for key in ("a", "wiki/Ab\u00e9", ""):
        digest = hashlib.sha256(b"ingest-sample:1\x00" + key.encode()).digest()
        assert unit_hash("ingest-sample:1", key) == int.from_bytes(digest[:8], "big") / 2**64
    assert 0 <= min(unit_hash("s", k) for k in IDS) and max(unit_hash("s", k) for k in IDS) < 1
    assert keep("s", "x", 1.0) and unit_hash("s", "\ud800") >= 0    # rate 1 keeps all; lone surrogates hash
    with pytest.raises(ValueError, match="NUL"):
        unit_hash("a\x00b", "c")


@pytest.mark.parametrize("first, second", list(permutations(CHOICES, 2)))
def test_each_choice_is_independent_of_the_others(first, second):
    """Among the ids one choice took, the other takes its own share (10,000 ids: 3 points is > 4 sigma)."""
    taken = [doc_id for doc_id in IDS if CHOICES[first](doc_id)]
    overall = sum(map(CHOICES[second], IDS)) / len(IDS)
    within = sum(map(CHOICES[second], taken)) / len(taken)
    assert abs(within - overall) < 0.03, f"{second} among {first}: {within:.3f} vs {overall:.3f}"


def write_ids(directory: Path, ids: list[str]) -> list[Path]:
    with DocumentWriter(directory) as writer:
        writer.write_all(Document(doc_id, f"text of {doc_id}", "wiki") for doc_id in ids)
    return document_files(directory)


def test_the_tokenizers_held_out_set_and_training_share_ignore_the_samples(tmp_path):
    files = write_ids(tmp_path / "all", IDS)
    heldout = select_heldout(files, 1000)
    assert len(heldout) == 1000
    for name, choice in CHOICES.items():
        overall = sum(map(choice, IDS)) / len(IDS)
        assert abs(sum(map(choice, heldout)) / len(heldout) - overall) < 0.05, name   # 1,000 ids: > 3 sigma
    sampled = [doc_id for doc_id in IDS if CHOICES["ingest sample 0.5"](doc_id)]
    corpus = TrainingCorpus(write_ids(tmp_path / "sampled", sampled), TokenizerConfig(train_fraction=0.4), set())
    assert sum(1 for _ in corpus.texts()) == corpus.train_docs
    assert abs(corpus.train_docs / len(sampled) - 0.4) < 0.03
