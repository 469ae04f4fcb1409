"""The evaluate stage's config: held-out text files, the tasks (file, format, k-shot, limit), device.

Importing this module does not import torch (recipes are validated without it).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from storage.configbase import StrictModel

# Each format's scoring: multiple choice (acc, acc_norm), partial "schema" scoring (winogrande),
# a cloze word greedy-decoded (lambada), and generation with exact match (unscramble).
FORMAT_KIND: dict[str, str] = {"arc": "choice", "piqa": "choice", "hellaswag": "choice", "swag": "choice",
                               "winogrande": "schema", "lambada": "cloze", "unscramble": "generate"}
LABEL_FILES = {"piqa": "required", "winogrande": "optional"}
TASK_NAME = r"^[a-z][a-z0-9_]*$"


class HeldoutConfig(StrictModel):
    """Language modelling on text files: loss, perplexity, bits per byte (BERT: masked-LM loss)."""

    files: list[str] = Field(default_factory=list, description="UTF-8 text files, each scored as one text")
    stride: int | None = Field(None, ge=1, description="GPT: tokens between window starts; None: seq_len "
                               "(disjoint windows); each token keeps at least seq_len - stride tokens of context. "
                               "A BERT's masked-LM windows never overlap: it reads no stride")
    max_chars: int | None = Field(None, ge=1, description="score only the first lines of each file, up to "
                                  "this many characters (a budget for demos; None: the whole file)")

    @model_validator(mode="after")
    def _knobs_need_files(self) -> "HeldoutConfig":
        if not self.files and (self.stride is not None or self.max_chars is not None):
            raise ValueError("heldout.stride and heldout.max_chars need heldout.files")
        names = [name.rsplit("/", 1)[-1] for name in self.files]
        if len(set(names)) != len(names):
            raise ValueError(f"heldout.files: two files share a name ({names}); stats are named by file name")
        return self


class TaskSpec(StrictModel):
    """One task: a file in a released layout, scored 0- or k-shot, on its first `limit` usable items."""

    name: str = Field(pattern=TASK_NAME, description="output folder and stat prefix, e.g. arc_easy")
    format: Literal["arc", "piqa", "hellaswag", "swag", "winogrande", "lambada", "unscramble"]
    path: str = Field(min_length=1, description="the task file; for unscramble, a text to draw words from")
    labels: str | None = Field(None, description="labels file (piqa: required; winogrande: optional)")
    num_fewshot: int = Field(0, ge=0, description="demonstrations before each item, drawn with `seed`")
    fewshot_path: str | None = Field(None, description="pool of demonstrations in the same format "
                                     "(default: the task file itself, never the scored item)")
    fewshot_labels: str | None = Field(None, description="labels file of fewshot_path (piqa, winogrande)")
    limit: int | None = Field(None, ge=1, description="score only the first `limit` usable items (None: all)")

    @model_validator(mode="after")
    def _files_fit_the_format(self) -> "TaskSpec":
        rule = LABEL_FILES.get(self.format, "no")
        if rule == "no" and (self.labels or self.fewshot_labels):
            raise ValueError(f"task {self.name!r}: {self.format} files carry their labels; remove labels")
        if rule == "required" and not self.labels:
            raise ValueError(f"task {self.name!r}: {self.format} needs `labels` (its labels file)")
        if rule == "required" and self.fewshot_path and not self.fewshot_labels:
            raise ValueError(f"task {self.name!r}: fewshot_path needs fewshot_labels for {self.format}")
        if self.fewshot_labels and not self.fewshot_path:
            raise ValueError(f"task {self.name!r}: fewshot_labels needs fewshot_path")
        if self.fewshot_path and not self.num_fewshot:
            raise ValueError(f"task {self.name!r}: fewshot_path is unused with num_fewshot=0")
        if self.format == "unscramble" and self.fewshot_path:
            raise ValueError(f"task {self.name!r}: unscramble draws its demonstrations from its own word list")
        return self

    @property
    def kind(self) -> str:
        return FORMAT_KIND[self.format]

    def files(self) -> list[str]:
        """Every file whose content decides this task's scores."""
        return [p for p in (self.path, self.labels, self.fewshot_path, self.fewshot_labels) if p]


class EvaluateConfig(StrictModel):
    """Zero/few-shot evaluation of a pretrained model: held-out bits per byte, multiple choice, generation."""

    non_output_fields = frozenset({"batch_tokens"})

    heldout: HeldoutConfig = HeldoutConfig()
    tasks: list[TaskSpec] = Field(default_factory=list)
    seed: int = Field(1234, description="few-shot draws, unscramble words, BERT masks: fixed across ablations")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    batch_tokens: int = Field(16384, ge=64, description="tokens per forward pass, padding included")

    @model_validator(mode="after")
    def _something_to_do(self) -> "EvaluateConfig":
        if not self.heldout.files and not self.tasks:
            raise ValueError("evaluate has nothing to do: name heldout.files or tasks")
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: names must be unique ({names})")
        if "aggregate" in names or "heldout" in names:
            raise ValueError("tasks: 'aggregate' and 'heldout' are reserved stat prefixes")
        return self

    def files(self) -> list[str]:
        """Every task and text file named in the config (their content enters the fingerprint)."""
        return [*self.heldout.files, *(path for task in self.tasks for path in task.files())]
