"""Each task kind's files, read into examples of one of five forms, with its labels and official metrics.

| kind       | files                               | form                      | official metric(s)            |
|------------|-------------------------------------|---------------------------|-------------------------------|
| glue       | GLUE TSV (`tasks.datasets.glue`)    | single / pair / similarity | per task (GLUE_METRICS)       |
| squad      | SQuAD v1.1/v2.0 JSON                | qa                        | exact, f1                     |
| conll      | CoNLL-2003 `token POS chunk tag`    | tagging                   | f1 (entity level)             |
| phrasebank | Financial PhraseBank `sentence@lab` | single                    | accuracy, f1_macro            |
| fomc       | FOMC CSV                            | single                    | f1_weighted, accuracy         |
| wiki_topic | the installed wiki summaries        | single                    | accuracy, f1_macro            |
| multiple_choice | ARC, PIQA, HellaSwag, SWAG, WinoGrande (`tasks.datasets.multiple_choice`) | choice | accuracy |

A multiple-choice task trains one head over a fixed number of answers: the number most items of
its training file have (ARC: 4); an item with another count is counted as `choice_count`, not padded.

Bad rows are counted per reason (`on_bad`); a task left with no usable rows fails naming its file.
Torch-free.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.sampling import unit_hash
from storage.stage import StageError
from tasks.datasets.badrows import BadRow, OnBad
from tasks.datasets.base import DatasetError
from tasks.datasets.conll import TaggedSentence, read_conll, tag_labels
from tasks.datasets.finance import FOMC_LABELS, PHRASEBANK_LABELS, read_fomc, read_phrasebank
from tasks.datasets.glue import GLUE_TASKS, GlueExample, GlueTask, glue_task, read_glue
from tasks.datasets.multiple_choice import ChoiceItem, read_choice_file
from tasks.datasets.squad import SquadExample, read_squad
from tasks.datasets.wiki_topic import DEFAULT_TEST_FRACTION, TOPICS, read_wiki_topic, split_wiki_topic, summaries_path
from tasks.finetune.config import HUB_PREFIX, TaskConfig

GLUE_SIMILARITY = ("mrpc", "stsb", "qqp")          # GPT-1 scores these in both orders
GLUE_SINGLE = ("cola", "sst2")
GLUE_METRICS = {"cola": ("matthews_corrcoef", "accuracy"), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"),
                "stsb": ("pearson", "spearmanr"), "qqp": ("f1", "accuracy"), "mnli": ("accuracy",),
                "qnli": ("accuracy",), "rte": ("accuracy",), "wnli": ("accuracy",), "ax": ("matthews_corrcoef",)}


@dataclass(frozen=True)
class TextExample:
    """A classification or regression example: one text or a pair, its label, an optional group (FOMC year)."""

    id: str
    text_a: str
    text_b: str | None
    label: Any
    group: str | None = None


@dataclass
class TaskData:
    """What a task trains and scores on, whatever its kind."""

    name: str
    kind: str
    form: str                          # single, pair, similarity, qa, tagging, choice
    labels: list[Any]                  # class labels in head order (tags for tagging; answer indices for
                                       # choice; empty: regression, qa)
    metrics: tuple[str, ...]           # the official metric(s) first
    train: list[Any]
    evals: dict[str, list[Any]]        # output folder name -> examples
    notes: list[str] = field(default_factory=list)
    allow_null: bool = False           # SQuAD v2: questions without an answer

    @property
    def regression(self) -> bool:
        return self.form in ("single", "pair", "similarity") and not self.labels


class BadRowCounter:
    """Collects the rows loaders skip: per reason, with file and line."""

    def __init__(self) -> None:
        self.rows: list[BadRow] = []

    def __call__(self, row: BadRow) -> None:
        self.rows.append(row)


def check_local(task: TaskConfig, path: str) -> Path:
    """A data path as a local file; a hub name fails offline with what to pass instead."""
    if path.startswith(HUB_PREFIX):
        raise StageError(f"task {task.name!r}: {path!r} is a hub dataset; lmforge reads task data from local files "
                         f"(the hub is not used offline): download it and give the file's path in "
                         f"finetune.tasks[{task.name}].train/eval")
    if not Path(path).is_file():
        raise StageError(f"task {task.name!r}: data file {path} not found (give a local file path; a hub dataset "
                         f"is written {HUB_PREFIX}<name>)")
    return Path(path)


# ---- readers per kind -------------------------------------------------------------------------


def _glue_reader(task: TaskConfig) -> Callable[[Path, OnBad], list[TextExample]]:
    def read(path: Path, on_bad: OnBad) -> list[TextExample]:
        rows: list[GlueExample] = read_glue(path, _glue_spec(task, path).name, on_bad)
        return [TextExample(r.id, r.text_a, r.text_b, r.label) for r in rows if _usable(path, r, on_bad)]
    return read


def _usable(path: Path, row: GlueExample, on_bad: OnBad) -> bool:
    """A labelled row with its text(s) present; the loader already refused unknown labels and short rows."""
    if row.label is None:
        on_bad(BadRow(str(path), row.line, "no_label", f"row id {row.id}: no label (a test file?)"))
        return False
    if not row.text_a.strip() or (row.text_b is not None and not row.text_b.strip()):
        on_bad(BadRow(str(path), row.line, "empty_text", f"row id {row.id}: a sentence is empty"))
        return False
    return True


def _glue_spec(task: TaskConfig, path: Path | str) -> GlueTask:
    """`glue_task` if set, else the task's name when it is a GLUE task, else the file's folder name."""
    key = task.name.lower().replace("-", "").replace("_", "")
    return glue_task(path, task.glue_task or (key if key in GLUE_TASKS else None))


def _text_reader(reader: Callable) -> Callable[[Path, OnBad], list[TextExample]]:
    def read(path: Path, on_bad: OnBad) -> list[TextExample]:
        return [TextExample(r.id, r.text, None, r.label, r.group) for r in reader(path, on_bad)]
    return read


def _squad_reader(path: Path, on_bad: OnBad) -> list[SquadExample]:
    return read_squad(path)


def _conll_reader(path: Path, on_bad: OnBad) -> list[TaggedSentence]:
    return read_conll(path, on_bad)


def _choice_reader(task: TaskConfig, path: str) -> Callable[[Path, OnBad], list[ChoiceItem]]:
    def read(local: Path, on_bad: OnBad) -> list[ChoiceItem]:
        labels = task.labels_file(path)
        result = read_choice_file(task.format, local, check_local(task, labels) if labels else None)
        for row in result.bad:
            on_bad(BadRow(row.path, row.line, row.reason, row.detail))
        return result.items
    return read


READERS = {"phrasebank": _text_reader(read_phrasebank), "fomc": _text_reader(read_fomc),
           "squad": _squad_reader, "conll": _conll_reader}


def _reader(task: TaskConfig, path: str) -> Callable[[Path, OnBad], list[Any]]:
    if task.kind == "glue":
        return _glue_reader(task)
    if task.kind == "multiple_choice":
        return _choice_reader(task, path)
    return READERS[task.kind]


def read_file(task: TaskConfig, path: str, bad: BadRowCounter) -> list[Any]:
    """The usable examples of one file; none at all is an error naming the file."""
    local = check_local(task, path)
    try:
        examples = _reader(task, path)(local, bad)
    except DatasetError as err:
        raise StageError(f"task {task.name!r}: {err}") from None
    if not examples:
        raise StageError(f"task {task.name!r}: {path} has no usable rows")
    return examples


# ---- splits and subsets -----------------------------------------------------------------------


def split_key(example: Any) -> str:
    """What decides an example's side of a carved split: its text (a SQuAD question: its paragraph),
    so duplicated sentences and shared contexts never sit on both sides."""
    if isinstance(example, SquadExample):
        return example.context
    if isinstance(example, TaggedSentence):
        return " ".join(example.tokens)
    if isinstance(example, ChoiceItem):
        return "\t".join(example.contexts + example.continuations)
    return example.text_a + "\t" + (example.text_b or "")


def carve(examples: list[Any], task: TaskConfig) -> tuple[list[Any], list[Any]]:
    """(train, eval) by a salted hash of each example's key: eval_fraction of the keys go to eval."""
    salt = f"finetune-split:{task.name}:{task.split.seed}"
    is_eval = [unit_hash(salt, split_key(e)) < task.split.eval_fraction for e in examples]
    return [e for e, ev in zip(examples, is_eval) if not ev], [e for e, ev in zip(examples, is_eval) if ev]


def example_id(example: Any) -> str:
    return example.id


def subset_order(examples: list[Any], salt: str) -> list[Any]:
    """The examples in a seeded order; its prefixes are the nested subsets (10% inside 20% inside ...)."""
    return sorted(examples, key=lambda e: (unit_hash(salt, example_id(e)), example_id(e)))


def take_fraction(ordered: list[Any], fraction: float) -> list[Any]:
    return ordered[:max(1, math.ceil(fraction * len(ordered)))]


# ---- the task ---------------------------------------------------------------------------------


def load_task(task: TaskConfig, seed: int, bad: BadRowCounter) -> TaskData:
    """The task's training and evaluation examples, labels and metrics."""
    if task.kind == "wiki_topic":
        return _limit(_wiki_topic(task, bad), task, seed)
    train = read_file(task, task.train, bad)
    if task.split is None:
        return _limit(_shape(task, train, _eval_files(task, bad), [], bad), task, seed)
    train, carved = carve(train, task)
    if not train or not carved:
        raise StageError(f"task {task.name!r}: carving {task.train} ({len(train) + len(carved)} usable rows) left "
                         f"{len(train)} to train on and {len(carved)} to evaluate; change split.eval_fraction or give "
                         "an eval file")
    note = (f"evaluation set carved out of {task.train}: {task.split.eval_fraction:.0%} of its keys by a salted hash "
            f"(seed {task.split.seed})")
    return _limit(_shape(task, train, {task.name: carved}, [note], bad), task, seed)


def _eval_files(task: TaskConfig, bad: BadRowCounter) -> dict[str, list[Any]]:
    if isinstance(task.eval, dict):
        return {f"{task.name}-{suffix}": read_file(task, path, bad) for suffix, path in task.eval.items()}
    return {task.name: read_file(task, task.eval, bad)}


def _wiki_topic(task: TaskConfig, bad: BadRowCounter) -> TaskData:
    path = summaries_path(task.language)
    fraction = task.split.eval_fraction if task.split else DEFAULT_TEST_FRACTION
    examples = [TextExample(e.id, e.text, None, e.label) for e in read_wiki_topic(path, bad)]
    train, test = split_wiki_topic(examples, "train", fraction), split_wiki_topic(examples, "test", fraction)
    note = f"train/test split by a salted hash of the title ({fraction:.0%} test) of {path.name}"
    return TaskData(task.name, task.kind, "single", list(TOPICS), ("accuracy", "f1_macro"), train,
                    {task.name: test}, [note])


def _shape(task: TaskConfig, train: list[Any], evals: dict[str, list[Any]], notes: list[str],
           bad: BadRowCounter) -> TaskData:
    """Form, labels and metrics of a kind read from files."""
    if task.kind == "squad":
        allow_null = any(e.is_impossible for e in train) or any(e.is_impossible for ex in evals.values() for e in ex)
        if not allow_null and task.null_threshold != TaskConfig.model_fields["null_threshold"].default:
            raise StageError(f"task {task.name!r}: null_threshold={task.null_threshold:g} decides when to answer "
                             "'no answer', but no question of its files is unanswerable (SQuAD v1.1): remove it")
        return TaskData(task.name, task.kind, "qa", [], ("exact", "f1"), train, evals, notes, allow_null)
    if task.kind == "conll":
        labels = tag_labels(train)
        return TaskData(task.name, task.kind, "tagging", labels, ("f1", "precision", "recall", "accuracy"),
                        train, evals, notes)
    if task.kind == "phrasebank":
        return TaskData(task.name, task.kind, "single", list(PHRASEBANK_LABELS), ("accuracy", "f1_macro"), train,
                        evals, notes)
    if task.kind == "fomc":
        return TaskData(task.name, task.kind, "single", list(FOMC_LABELS), ("f1_weighted", "accuracy", "f1_macro"),
                        train, evals, notes)
    if task.kind == "multiple_choice":
        return _choice(task, train, evals, notes, bad)
    return _glue(task, train, evals, notes)


def _choice(task: TaskConfig, train: list[ChoiceItem], evals: dict[str, list[ChoiceItem]], notes: list[str],
            bad: BadRowCounter) -> TaskData:
    """A fixed number of answers (the training file's most common count); other items are counted, not used."""
    n_choices = Counter(len(item.choices) for item in train).most_common(1)[0][0]

    def keep(items: list[ChoiceItem], path: str) -> list[ChoiceItem]:
        for item in items:
            if len(item.choices) != n_choices:
                bad(BadRow(path, item.line, "choice_count", f"item {item.id}: {len(item.choices)} answers, "
                           f"the task's head scores {n_choices}"))
        kept = [item for item in items if len(item.choices) == n_choices]
        if not kept:
            raise StageError(f"task {task.name!r}: {path} has no item with {n_choices} answers")
        return kept

    eval_path = task.eval if isinstance(task.eval, str) else task.train
    notes = [*notes, f"{task.format}: {n_choices} answers per item, each read as a (context, answer) pair"]
    return TaskData(task.name, f"multiple_choice/{task.format}", "choice", list(range(n_choices)), ("accuracy",),
                    keep(train, task.train), {name: keep(items, eval_path) for name, items in evals.items()}, notes)


def _glue(task: TaskConfig, train: list[Any], evals: dict[str, list[Any]], notes: list[str]) -> TaskData:
    spec = _glue_spec(task, task.train)
    form = "single" if spec.name in GLUE_SINGLE else "similarity" if spec.name in GLUE_SIMILARITY else "pair"
    labels = [] if spec.is_regression else [int(v) if v.isdigit() else v for v in spec.labels]
    return TaskData(task.name, f"glue/{spec.name}", form, labels, GLUE_METRICS[spec.name], train, evals, notes)


def _limit(data: TaskData, task: TaskConfig, seed: int) -> TaskData:
    """The seeded training subset and the first evaluation rows, when the recipe caps them."""
    if task.max_train_examples and len(data.train) > task.max_train_examples:
        ordered = subset_order(data.train, f"finetune-subset:{task.name}:{seed}")
        data.train = ordered[:task.max_train_examples]
        data.notes.append(f"trained on a seeded subset of {task.max_train_examples} training examples")
    if task.max_eval_examples:
        for name, examples in data.evals.items():
            if len(examples) > task.max_eval_examples:
                data.evals[name] = examples[:task.max_eval_examples]
                data.notes.append(f"{name}: scored on the first {task.max_eval_examples} of {len(examples)} "
                                  "evaluation examples")
    return data
