"""The files one stage writes and another reads, each a pydantic model used by both sides.

A writer builds the model and calls `write(path)`; a reader calls `Model.read(path)` and gets either a
validated object or a `FileFormatError` naming the file and the field. Nothing downstream indexes a
raw dict of these files.

| file                                   | model             | written by        | read by                    |
|----------------------------------------|-------------------|-------------------|----------------------------|
| `shard/<fp>/manifest.json`             | `ShardManifest`   | shard             | pretrain                   |
| `tokenizer/<fp>/tokenizer_config.json` | `TokenizerFile`   | tokenizer         | shard, pretrain, models    |
| `<model dir>/config.json`              | `ModelSpec`       | pretrain          | models (`load_pretrained`) |
| pretrain `_SUCCESS.json` `artifacts`   | `PretrainArtifacts` | pretrain        | finetune, evaluate         |
| `<task>/metrics.json`                  | `TaskMetrics`     | finetune, evaluate | dashboard, scorers        |
| `<task>/predictions.jsonl`             | `PredictionRow`   | finetune, evaluate | dashboard, scorers        |

`metrics.json` is a flat mapping (metric name -> value, the task's official metric first, by its usual
name: `accuracy`, `f1`, `exact`, `matthews_corrcoef`, ...); each line of `predictions.jsonl` is
`{id, prediction, gold}`, so an independent scorer can recompute every number.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, model_validator
from pydantic import ValidationInfo, field_validator

from storage.stage import StageError

T = TypeVar("T", bound="JsonFile")
JsonValue = str | int | float | bool | None | list[Any] | dict[str, Any]


class FileFormatError(StageError):
    """A file between stages is missing, not JSON, or has a wrong field; the message names file and field."""


def describe(err: ValidationError, path: Path | str, where: str = "") -> str:
    """`path[:line]: field a.b: message; ...` for every problem pydantic found."""
    problems = []
    for problem in err.errors():
        field = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        message = "unknown field" if problem["type"] == "extra_forbidden" else problem["msg"]
        problems.append(f"field '{field}': {message}")
    return f"{path}{where}: " + "; ".join(problems)


class JsonFile:
    """Reading and writing one JSON file through a pydantic model (mixed into `FileModel`, `TaskMetrics`)."""

    @classmethod
    def read(cls: type[T], path: Path | str) -> T:
        path = Path(path)
        if not path.is_file():
            raise FileFormatError(f"{path}: missing")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FileFormatError(f"{path}: not valid JSON ({err})") from None
        return cls.parse(data, path)

    @classmethod
    def parse(cls: type[T], data: Any, origin: Path | str) -> T:
        """Validates already-decoded JSON; errors name `origin`."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise FileFormatError(describe(err, origin)) from None

    def write(self, path: Path | str) -> Path:
        """Writes the file through a temporary name, so a reader never sees half of it."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


class FileModel(JsonFile, BaseModel):
    """A JSON object with a fixed shape: frozen, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# ---- tokenizer ------------------------------------------------------------------------------


class TokenizerFile(FileModel):
    """`tokenizer_config.json`: the split pattern and special tokens beside the tiktoken rank file.

    Ids run 0..vocab_size-1: the `n_ranks` ranks (a pretrained vocabulary may leave gaps) and the
    special tokens, each id used once. Cross-field checks sit on the later field, so errors name it.
    """

    pattern: str = Field(min_length=1)
    special_tokens: dict[str, int]
    vocab_size: int = Field(ge=1)
    n_ranks: int = Field(ge=1)
    origin: str = "file"

    @field_validator("special_tokens")
    @classmethod
    def _distinct_ids(cls, specials: dict[str, int]) -> dict[str, int]:
        if len(set(specials.values())) != len(specials):
            raise ValueError(f"two special tokens share an id in {specials}")
        return specials

    @field_validator("vocab_size")
    @classmethod
    def _ids_fit(cls, vocab_size: int, info: ValidationInfo) -> int:
        outside = {name: i for name, i in info.data.get("special_tokens", {}).items() if not 0 <= i < vocab_size}
        if outside:
            raise ValueError(f"{vocab_size} is not above the special token ids {outside}")
        return vocab_size

    @field_validator("n_ranks")
    @classmethod
    def _ranks_fit(cls, n_ranks: int, info: ValidationInfo) -> int:
        if "vocab_size" in info.data and n_ranks + len(info.data.get("special_tokens", {})) > info.data["vocab_size"]:
            raise ValueError(f"{n_ranks} ranks and {len(info.data['special_tokens'])} special tokens exceed "
                             f"vocab_size {info.data['vocab_size']}")
        return n_ranks


# ---- token shards ---------------------------------------------------------------------------


class ShardEntry(FileModel):
    """One shard file and its token counts."""

    path: str = Field(min_length=1)
    rows: int = Field(ge=0)
    tokens: int = Field(ge=0)
    tokens_train: int = Field(ge=0)
    tokens_val: int = Field(ge=0)

    @field_validator("tokens_val")
    @classmethod
    def _splits_add_up(cls, tokens_val: int, info: ValidationInfo) -> int:
        tokens, train = info.data.get("tokens"), info.data.get("tokens_train")
        if tokens is not None and train is not None and tokens != train + tokens_val:
            raise ValueError(f"tokens {tokens} != tokens_train {train} + tokens_val {tokens_val}")
        return tokens_val


class SplitTokens(FileModel):
    """Tokens of one source in each split."""

    train: int = Field(ge=0)
    val: int = Field(ge=0)


class MixtureSource(FileModel):
    """One source of a token-weighted mixture: its share, the training tokens it had and got, the epochs that makes."""

    share: float = Field(ge=0, le=1)           # weight / sum of weights; 0 for a source left out of the mixture
    available_tokens: int = Field(ge=0)        # its training tokens before mixing
    target_tokens: int = Field(ge=0)           # share x the mixture's target_tokens
    tokens: int = Field(ge=0)                  # training tokens written, repeats included
    epochs: float = Field(ge=0)                # tokens / available_tokens


class Mixture(FileModel):
    """How the training rows were mixed (`shard.mixture`): the seed, the rule, and each source's outcome."""

    seed: int
    rule: str = Field(min_length=1)
    repeat_id_format: str
    target_tokens: int = Field(ge=0)
    sources: dict[str, MixtureSource]


class ShardManifest(FileModel):
    """`manifest.json`: the token layout, the split rule, and counts per shard and source.

    A shard stage whose input held no documents writes a manifest with no shards and zero tokens.
    Cross-field checks sit on the later field, so errors name it.
    """

    vocab_size: int = Field(ge=1)
    token_dtype: Literal["uint16", "uint32"]
    special_tokens: dict[str, int]
    eot_token: str | None
    eot_id: int | None
    eot_appended: bool = False
    val_fraction: float = Field(ge=0, lt=1)
    split_rule: str = Field(min_length=1)
    max_tokens_per_doc: int | None = Field(gt=0)
    overlong: Literal["split", "truncate"]
    split_doc_id_format: str
    shards: list[ShardEntry]
    tokens_by_source: dict[str, SplitTokens]
    total_tokens: int = Field(ge=0)
    mixture: Mixture | None = Field(None, exclude_if=lambda value: value is None)   # only when shard.mixture is set

    @field_validator("token_dtype")
    @classmethod
    def _dtype_fits(cls, dtype: str, info: ValidationInfo) -> str:
        vocab_size = info.data.get("vocab_size")
        if vocab_size is not None and (dtype == "uint16") != (vocab_size <= 65_535):
            raise ValueError(f"{dtype} is not the token type of vocab_size {vocab_size} (uint16 up to 65,535)")
        return dtype

    @field_validator("eot_id")
    @classmethod
    def _eot_is_special(cls, eot_id: int | None, info: ValidationInfo) -> int | None:
        if "eot_token" in info.data and "special_tokens" in info.data:
            token = info.data["eot_token"]
            expected = None if token is None else info.data["special_tokens"].get(token)
            if eot_id != expected:
                raise ValueError(f"{eot_id} is not the id of eot_token {token!r} in special_tokens ({expected})")
        return eot_id

    @field_validator("total_tokens")
    @classmethod
    def _totals_add_up(cls, total: int, info: ValidationInfo) -> int:
        if "shards" in info.data and total != sum(shard.tokens for shard in info.data["shards"]):
            raise ValueError(f"{total} != {sum(s.tokens for s in info.data['shards'])}, the sum over shards")
        if "tokens_by_source" in info.data:
            by_source = sum(split.train + split.val for split in info.data["tokens_by_source"].values())
            if total != by_source:
                raise ValueError(f"{total} != {by_source}, the sum of tokens_by_source")
        return total

    @property
    def tokens_train(self) -> int:
        return sum(shard.tokens_train for shard in self.shards)

    @property
    def tokens_val(self) -> int:
        return sum(shard.tokens_val for shard in self.shards)


# ---- models ---------------------------------------------------------------------------------


class ModelSpec(FileModel):
    """A fully resolved model shape; `config.json` beside the weights of every lmforge model."""

    arch: Literal["gpt", "bert"]
    n_layer: int = Field(ge=1)
    n_head: int = Field(ge=1)
    d_model: int = Field(ge=1)
    d_mlp: int = Field(ge=1)
    seq_len: int = Field(ge=2)
    vocab_size: int = Field(ge=1)     # real token ids run 0..vocab_size-1
    padded_vocab_size: int            # embedding rows (a multiple of 128, fast matmuls)
    dropout: float = 0.0
    bias: bool = True
    norm: Literal["pre", "post"] = "pre"
    layer_norm_eps: float = 1e-5
    type_vocab_size: int = 2          # BERT segments A/B
    nsp: bool = False                 # BERT: a next-sentence head on [CLS]
    n_experts: int = 0
    top_k: int = 2
    aux_loss_weight: float = 0.01
    special_tokens: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSpec":
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size {self.vocab_size}")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def write(self, path: Path | str) -> Path:
        """Keys sorted, as lmforge has always written `config.json` (its bytes enter checkpoint digests)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


class PretrainArtifacts(FileModel):
    """The `artifacts` of a pretrain `_SUCCESS.json`: where the final weights are, and their shape."""

    final_checkpoint: str
    model: ModelSpec

    @classmethod
    def from_success(cls, success: dict[str, Any], origin: Path | str) -> "PretrainArtifacts":
        return cls.parse(success.get("artifacts"), f"{origin} (artifacts)")


# ---- fine-tuning and evaluation results -----------------------------------------------------


class TaskMetrics(JsonFile, RootModel[dict[str, float]]):
    """`<task>/metrics.json`: metric name -> value, the official metric(s) first; every value finite."""

    model_config = ConfigDict(frozen=True)

    @model_validator(mode="after")
    def _finite(self) -> "TaskMetrics":
        bad = [name for name, value in self.root.items() if not math.isfinite(value)]
        if bad:
            raise ValueError(f"metrics {bad} are not finite")
        return self

    def stats(self, task: str) -> dict[str, float]:
        """The `stage_stats` rows of one task: `<task>/<metric>`."""
        return {f"{task}/{name}": value for name, value in self.root.items()}


class PredictionRow(FileModel):
    """One line of `<task>/predictions.jsonl`: enough for an independent scorer to recompute the metrics."""

    id: str
    prediction: JsonValue
    gold: JsonValue
    # Log-likelihood scoring (evaluate): the exact strings scored, pair i = (context or context[i],
    # continuations[i]), one natural-log likelihood each, and whether each is the greedy decode.
    # Left out of the line when not given, so other tasks' rows stay {id, prediction, gold}.
    context: str | list[str] | None = Field(None, exclude_if=lambda value: value is None)
    continuations: list[str] | None = Field(None, exclude_if=lambda value: value is None)
    loglikelihoods: list[float] | None = Field(None, exclude_if=lambda value: value is None)
    greedy: list[bool] | None = Field(None, exclude_if=lambda value: value is None)


def write_predictions(path: Path | str, rows: Iterable[PredictionRow]) -> int:
    """Writes one JSON object per line through a temporary name; returns the number of rows."""
    path, count = Path(path), 0
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(row.model_dump_json() + "\n")
            count += 1
    os.replace(tmp, path)
    return count


def read_predictions(path: Path | str) -> Iterator[PredictionRow]:
    """The rows of a predictions file; a bad line raises `FileFormatError` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: missing")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise FileFormatError(f"{path}:{number}: not valid JSON ({err})") from None
            try:
                yield PredictionRow.model_validate(data)
            except ValidationError as err:
                raise FileFormatError(describe(err, path, f":{number}")) from None
