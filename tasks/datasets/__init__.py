"""Evaluation and fine-tuning datasets as shipped (GLUE TSVs, SQuAD JSON), read into typed examples.

One loader per dataset, shared by dedup's decontamination and the fine-tuning stage, so both see the
same examples. Plain Python (no torch, no datatrove). A malformed file raises `DatasetError` naming
the file and the line (TSV) or the JSON location.

    from tasks.datasets import read_glue, read_squad
    examples = read_glue("glue/rte/dev.tsv")          # task from the folder name, or task="rte"
    questions = read_squad("squad/dev-v1.1.json")     # nested official format or flat rows
"""
from __future__ import annotations

from tasks.datasets.base import DatasetError
from tasks.datasets.glue import GLUE_TASKS, GlueExample, GlueTask, glue_task, iter_glue, read_glue
from tasks.datasets.squad import SquadAnswer, SquadExample, iter_squad, read_squad

__all__ = ["GLUE_TASKS", "DatasetError", "GlueExample", "GlueTask", "SquadAnswer", "SquadExample", "glue_task",
           "iter_glue", "iter_squad", "read_glue", "read_squad"]
