"""The dedup-specific datatrove pieces: the exact-dedup key, the duplicate filters counting their reason,
and the decontamination filter with a flag mode."""
from __future__ import annotations

from typing import Literal

from datatrove.data import Document as DtDocument
from datatrove.pipeline.decont.n_grams import NGramsDecontFilter
from datatrove.pipeline.dedup import ExactDedupFilter, MinhashDedupFilter
from datatrove.utils.text import simplify_text

from tasks.dedup.evalsets import decont_config
from tasks.docpipe.steps import ReasonedDrops


def normalized_text(doc: DtDocument) -> str:
    """The exact-dedup key: lowercase, no punctuation, numbers and whitespace folded (datatrove's simplify_text)."""
    return simplify_text(doc.text)


class ExactDuplicateFilter(ReasonedDrops, ExactDedupFilter):
    """datatrove's exact-dedup filter; each document it drops counts as `dropped_duplicate`."""

    drop_reason = "duplicate"


class MinhashDuplicateFilter(ReasonedDrops, MinhashDedupFilter):
    """datatrove's MinHash filter (stage 4); each document it drops counts as `dropped_duplicate`."""

    drop_reason = "duplicate"


class Decontaminate(NGramsDecontFilter):
    """datatrove's n-gram decontamination; the drop reason is the eval set's name.

    In `flag` mode nothing is dropped: the document keeps `contaminated_ngram` / `contaminated_task`
    in its metadata and counts as `flagged_<eval set>`.
    """

    def __init__(self, index_folder: str, n_gram: int, mode: Literal["drop", "flag"], language: str = "en") -> None:
        super().__init__(index_folder, config=decont_config(n_gram), language=language)
        self.mode = mode

    def filter(self, doc: DtDocument) -> bool | tuple[bool, str]:
        if super().filter(doc) is True:
            return True
        eval_set = doc.metadata["contaminated_task"]
        if self.mode == "flag":
            self.stat_update(f"flagged_{eval_set}")
            return True
        return False, eval_set
