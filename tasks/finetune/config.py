"""The finetune stage's config: which tasks, from which files, with which hyperparameters (torch-free).

    finetune:
      init: pretrained                  # or random: the same architecture freshly initialised (the control)
      tasks:
        - {name: sst2, kind: glue, train: ../shared/data/glue/sst2/train.head5000.tsv,
           eval: ../shared/data/glue/sst2/dev.tsv, epochs: 3}
        - {name: squad2, kind: squad, train: ..., eval: ..., doc_stride: 64}

A hyperparameter left unset takes its family's default once the architecture is known (BERT paper:
lr 3e-5, warmup 10%; GPT-1: lr 6.25e-5, warmup 0.2%, auxiliary LM weight 0.5); both decay linearly
to zero. Every field changes the output except those in `non_output_fields`; a knob the task's kind
cannot use is an error, so no two fingerprints name the same result.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from storage.configbase import StrictModel

Init = Literal["pretrained", "random"]
Kind = Literal["glue", "squad", "conll", "phrasebank", "fomc", "wiki_topic", "multiple_choice"]
CHOICE_FORMATS = ("arc", "piqa", "hellaswag", "swag", "winogrande")
TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
HUB_PREFIX = "hf:"
QA_FIELDS = ("doc_stride", "max_query_length", "n_best", "max_answer_length", "null_threshold")


class SplitConfig(StrictModel):
    """Carve the evaluation set out of the training file (for tasks shipped as one file)."""

    eval_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = Field(0, description="salts the hash of each example's key; the pipeline seed does not enter")


class CurveConfig(StrictModel):
    """A sample-efficiency curve: the task trained on nested, seeded subsets of its training data."""

    fractions: list[float] = [0.1, 0.2, 0.5, 1.0]
    inits: list[Init] = ["pretrained", "random"]

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, fractions: list[float]) -> list[float]:
        if not fractions or any(not 0 < f <= 1 for f in fractions) or len(set(fractions)) != len(fractions):
            raise ValueError(f"fractions {fractions} must be distinct numbers in (0, 1]")
        return sorted(fractions)


class TaskTokens(StrictModel):
    """GPT-1's task tokens; None takes an unused row of the padded embedding (grown by 128 rows if full)."""

    start: str | None = None
    delim: str | None = None
    extract: str | None = None


class TaskConfig(StrictModel):
    """One fine-tuning task: its data and hyperparameters."""

    name: str = Field(description="the output folder <name>/; for kind glue also the GLUE task unless glue_task")
    kind: Kind
    glue_task: str | None = Field(None, description="kind glue: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli")
    train: str | None = Field(None, description="a local file, or hf:<dataset>[:<config>] (needs the network)")
    eval: str | dict[str, str] | None = Field(None, description="a file, or {suffix: file} scored as <name>-<suffix>")
    split: SplitConfig | None = Field(None, description="no eval file: carve eval out of train, seeded")
    language: str = Field("en", description="kind wiki_topic: en, es or fr")
    format: str | None = Field(None, description="kind multiple_choice: arc, piqa, hellaswag, swag or winogrande")
    train_labels: str | None = Field(None, description="kind multiple_choice: the train file's labels file "
                                     "(piqa: required; winogrande: optional)")
    eval_labels: str | None = Field(None, description="kind multiple_choice: the eval file's labels file")
    max_train_examples: int | None = Field(None, ge=1, description="a seeded subset of the training rows")
    max_eval_examples: int | None = Field(None, ge=1, description="the first N evaluation rows")
    epochs: float = Field(3.0, gt=0)
    batch_size: int = Field(32, ge=1)
    micro_batch: int | None = Field(None, ge=1, description="None: the largest divisor of the batch up to 16 (CPU)")
    lr: float | None = Field(None, gt=0, description="None: 3e-5 (BERT) or 6.25e-5 (GPT)")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="None: 0.1 (BERT) or 0.002 (GPT)")
    weight_decay: float = Field(0.01, ge=0)
    dropout: float = Field(0.1, ge=0, lt=1, description="in the encoder and before the head")
    lm_weight: float = Field(0.5, ge=0, description="GPT: L = L_task + lm_weight * L_LM; 0 turns it off")
    max_length: int | None = Field(None, ge=8, description="tokens per sequence; None: the model's seq_len")
    doc_stride: int | None = Field(None, ge=1, description="QA: tokens between window starts; None: seq_len / 2")
    max_query_length: int = Field(64, ge=1)
    n_best: int = Field(20, ge=1)
    max_answer_length: int = Field(30, ge=1, description="in tokens")
    null_threshold: float = Field(0.0, description="SQuAD v2: answer '' when score_null - best_span > this")
    group_by_length: bool = Field(True, description="batches of similar lengths (less padding), in a seeded "
                                  "order, as HF Trainer's group_by_length")
    select_best_epoch: bool = Field(False, description="score every epoch on the eval set and keep the best "
                                    "(reported as dev-selected)")
    sample_efficiency: CurveConfig | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not TASK_NAME.match(name):
            raise ValueError(f"task name {name!r} must match {TASK_NAME.pattern} (it names a folder)")
        return name

    @model_validator(mode="after")
    def _data(self) -> "TaskConfig":
        if self.kind == "wiki_topic":
            if self.train or self.eval:
                raise ValueError(f"task {self.name!r}: kind wiki_topic reads the installed summaries; "
                                 "remove train/eval (split.eval_fraction sets the test share)")
            return self
        if not self.train:
            raise ValueError(f"task {self.name!r}: 'train' is required (a local file path)")
        if (self.eval is None) == (self.split is None):
            raise ValueError(f"task {self.name!r}: give exactly one of 'eval' (a file) and 'split' "
                             "(carve the eval set out of the training file)")
        return self

    @model_validator(mode="after")
    def _every_knob_acts(self) -> "TaskConfig":
        defaults = TaskConfig.model_fields
        if self.kind != "squad":
            for name in QA_FIELDS:
                if getattr(self, name) != defaults[name].default:
                    raise ValueError(f"task {self.name!r}: {name} is a SQuAD option (kind squad)")
        if self.glue_task is not None and self.kind != "glue":
            raise ValueError(f"task {self.name!r}: glue_task is a kind glue option")
        if self.language != "en" and self.kind != "wiki_topic":
            raise ValueError(f"task {self.name!r}: language is a kind wiki_topic option")
        self._choice_fields()
        if self.select_best_epoch and self.epochs != int(self.epochs):
            raise ValueError(f"task {self.name!r}: select_best_epoch needs a whole number of epochs")
        return self

    def _choice_fields(self) -> None:
        """format and labels files belong to kind multiple_choice, and follow its format's rule."""
        if self.kind != "multiple_choice":
            for name in ("format", "train_labels", "eval_labels"):
                if getattr(self, name) is not None:
                    raise ValueError(f"task {self.name!r}: {name} is a kind multiple_choice option")
            return
        if self.format not in CHOICE_FORMATS:
            raise ValueError(f"task {self.name!r}: kind multiple_choice needs format, one of {', '.join(CHOICE_FORMATS)}")
        if isinstance(self.eval, dict):
            raise ValueError(f"task {self.name!r}: kind multiple_choice scores one eval file")
        if self.eval_labels and not self.eval:
            raise ValueError(f"task {self.name!r}: eval_labels needs an eval file")
        rule = {"piqa": "required", "winogrande": "optional"}.get(self.format, "no")
        given = [name for name in ("train_labels", "eval_labels") if getattr(self, name)]
        if rule == "no" and given:
            raise ValueError(f"task {self.name!r}: {self.format} files carry their labels; remove {', '.join(given)}")
        missing = [name for name, path in (("train_labels", self.train), ("eval_labels", self.eval))
                   if path and not getattr(self, name)]
        if rule == "required" and missing:
            raise ValueError(f"task {self.name!r}: {self.format} keeps its labels in a separate file: "
                             f"set {', '.join(missing)}")

    def labels_file(self, path: str) -> str | None:
        """The labels file of data file `path` (kind multiple_choice), if any."""
        return self.train_labels if path == self.train else self.eval_labels if path == self.eval else None

    def data_paths(self) -> list[str]:
        """The task's data files as given (hub names included), labels files too."""
        evals = list(self.eval.values()) if isinstance(self.eval, dict) else [self.eval] if self.eval else []
        return [p for p in (self.train, *evals, self.train_labels, self.eval_labels) if p]


class FinetuneConfig(StrictModel):
    """The finetune stage: every task fine-tuned from the pretrain stage's model (or a random init)."""

    # eval_batch_size groups the dev set into forward passes; padding moves the logits only within float
    # tolerance (as evaluate's batch_tokens does), so one fingerprint names the result at any batch size
    non_output_fields = frozenset({"log_every", "progress", "launcher", "peak_flops", "eval_batch_size"})

    init: Init = "pretrained"
    tasks: list[TaskConfig] = Field(min_length=1)
    task_tokens: TaskTokens = TaskTokens()
    precision: Literal["fp32", "bf16"] = "bf16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    nproc_per_node: int = Field(1, ge=1, description="torchrun processes (DDP); the batch is split across them")
    launcher: Literal["auto", "torchrun", "inprocess"] = Field(
        "auto", description="auto: in the stage's process for one process, torchrun for more (same results)")
    eval_batch_size: int = Field(64, ge=1, description="dev examples per forward pass (speed and memory only)")
    log_every: int = Field(10, ge=1)
    peak_flops: float | None = Field(None, gt=0)
    progress: bool = True

    @model_validator(mode="after")
    def _unique(self) -> "FinetuneConfig":
        names = [task.name for task in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"task names must be unique (they name folders): {duplicates}")
        if self.launcher == "inprocess" and self.nproc_per_node > 1:
            raise ValueError("launcher='inprocess' runs one process; nproc_per_node > 1 needs torchrun")
        return self
