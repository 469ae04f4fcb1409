"""evaluate: zero/few-shot evaluation of a pretrained model, as FineWeb and DCLM judge data ablations.

Held-out bits per byte on text files, multiple choice scored by log-likelihood exactly as
lm-evaluation-harness scores it, generative k-shot with exact match, and one aggregate (DCLM's
CORE-style mean of chance-centred accuracies). Declared here without importing torch;
`tasks.evaluate.stage.run` does the work and writes `<task>/metrics.json`, `<task>/predictions.jsonl`,
`<task>/task.json`, `heldout.json` and `results.json`.
"""
from __future__ import annotations

from typing import Any

from storage.fingerprint import file_signature
from storage.stage import Stage, deferred
from tasks.evaluate.config import EvaluateConfig, HeldoutConfig, TaskSpec

VERSION = "2"   # 2: a BERT's heldout.json records stride null (its windows do not overlap); a task file with a
#                UTF-8 byte-order mark keeps its first row


def external_inputs(config: EvaluateConfig) -> dict[str, Any]:
    """The content of every task and text file the recipe names."""
    return {"files": [file_signature(path) for path in config.files()]}


# The pipeline seed never matters: `seed` in the config fixes the few-shot draws, so ablations trained
# with different seeds are judged on the same prompts.
STAGE = Stage(name="evaluate", version=VERSION, config=EvaluateConfig, run=deferred("tasks.evaluate.stage:run"),
              reads=("pretrain", "tokenizer"), external_inputs=external_inputs,
              headline=("aggregate/core", "heldout/*/bpb"))
run = STAGE.run
__all__ = ["STAGE", "VERSION", "EvaluateConfig", "HeldoutConfig", "TaskSpec", "external_inputs", "run"]
