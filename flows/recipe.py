"""Recipes: YAML validated by the pipeline config, with `--set a.b=value` overrides."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from flows.stages import PIPELINE_ORDER, STAGES, StageConfigs, input_stages
from storage.configbase import StrictModel


class Schedule(StrictModel):
    """When `lmforge serve` runs the recipe (a cron expression); never part of any fingerprint."""

    cron: str = Field(description='e.g. "0 3 * * *" for 03:00 every day')
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, cron: str) -> str:
        if len(cron.split()) != 5:
            raise ValueError(f"cron {cron!r}: expected five fields (minute hour day month weekday)")
        return cron


class AblationTag(StrictModel):
    """Which ablation grid, variant and seed a recipe is (set by `lmforge ablate`); no fingerprint sees it."""

    grid: str
    variant: str
    position: int = Field(0, ge=0, description="the variant's place in the grid (tables keep the grid's order)")
    seed: int
    overrides: dict[str, Any] = {}


class PipelineConfig(StageConfigs):
    """A whole pipeline: a name, a seed, and one config per stage (a stage left out does not run)."""

    name: str = Field("lmforge", pattern=r"^[A-Za-z0-9_.-]+$")
    experiment: str = Field("lmforge", description="MLflow experiment that holds the runs")
    seed: int = 1337
    schedule: Schedule | None = Field(None, description="cron schedule of the deployment `lmforge serve` makes")
    ablation: AblationTag | None = Field(None, description="set by `lmforge ablate`: the grid, variant and seed")

    @model_validator(mode="after")
    def _inputs_available(self) -> "PipelineConfig":
        enabled = self.enabled_stages()
        for name in enabled:
            input_stages(STAGES[name], enabled, getattr(self, name))   # raises naming the stage and the input
        return self

    def enabled_stages(self) -> list[str]:
        """The stages this recipe configures, in pipeline order."""
        return [name for name in PIPELINE_ORDER if getattr(self, name, None) is not None]


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the field."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], value parsed as a YAML scalar or list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set pretrain.optim.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise RecipeError(f"--set {item!r}: the value is not valid YAML ({yaml_problem(err)})") from err
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of `data` with every `a.b=value` applied (list items addressed by index)."""
    return apply_values(data, {key: value for key, value in map(_parsed, overrides)}, "--set ")


def _parsed(item: str) -> tuple[str, Any]:
    path, value = parse_override(item)
    return ".".join(path), value


def apply_values(data: dict[str, Any], values: dict[str, Any], label: str = "") -> dict[str, Any]:
    """A copy of `data` with `{"a.b.0.c": value}` set; `label` prefixes error messages."""
    import copy

    data = copy.deepcopy(data)
    for dotted, value in values.items():
        path, item = dotted.split("."), f"{label}{dotted!r}"
        node: Any = data
        for i, key in enumerate(path[:-1]):
            node = _child(node, key, path[: i + 1], item)
        _assign(node, path[-1], value, item)
    return data


def _child(node: Any, key: str, walked: list[str], item: str) -> Any:
    if isinstance(node, list):
        return node[_index(key, node, item)]
    if not isinstance(node, dict):
        raise RecipeError(f"{item}: {'.'.join(walked[:-1])} is not a mapping")
    if node.get(key) is None:
        node[key] = {}
    return node[key]


def _assign(node: Any, key: str, value: Any, item: str) -> None:
    if isinstance(node, list):
        node[_index(key, node, item)] = value
    elif isinstance(node, dict):
        node[key] = value
    else:
        raise RecipeError(f"{item}: cannot set {key!r} inside a {type(node).__name__}")


def _index(key: str, node: list, item: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise RecipeError(f"{item}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


def format_validation_error(err: ValidationError, origin: str) -> str:
    """One line per problem: `<file>: <field.path>: <message>`."""
    lines = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key (not a field of this section)"
        lines.append(f"{origin}: {where}: {message}")
    return "\n".join(lines)


def yaml_problem(err: yaml.YAMLError) -> str:
    """`line L, column C: <problem>` of a YAML syntax error (1-based, as editors count)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def read_yaml_mapping(path: str | Path, what: str = "recipe") -> dict[str, Any]:
    """A YAML (or JSON) file that must hold a mapping; RecipeError naming the file otherwise."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise RecipeError(f"{path}: cannot read {what}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML at {yaml_problem(err)}") from err
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a {what} is a mapping of keys to values")
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Reads, overrides and validates a recipe; raises RecipeError naming the file and field."""
    data = read_yaml_mapping(path)
    data.setdefault("name", Path(path).stem)
    return validate_recipe(apply_overrides(data, overrides or []), str(path))


def validate_recipe(data: dict[str, Any], origin: str, _borrowing: tuple[Path, ...] = ()) -> PipelineConfig:
    """The recipe as a PipelineConfig; every `<stage>.from_recipe` it names must be a valid recipe with that stage."""
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, origin)) from err
    check_borrowed(config, origin, _borrowing)
    return config


def check_borrowed(config: PipelineConfig, origin: str, borrowing: tuple[Path, ...] = ()) -> None:
    """Each `<stage>.from_recipe` is read and validated now, so a missing or broken one stops the run before any
    work, naming the field (the planner takes that recipe's stage when the run starts)."""
    for name in config.enabled_stages():
        other = getattr(getattr(config, name), "from_recipe", None)
        if not other:
            continue
        field = f"{origin}: {name}.from_recipe"
        resolved = Path(other).resolve()
        if resolved in borrowing:
            chain = " -> ".join(str(p) for p in (*borrowing, resolved))
            raise RecipeError(f"{field}: {chain} refers back to itself")
        try:
            data = read_yaml_mapping(other)
            data.setdefault("name", Path(other).stem)
            borrowed = validate_recipe(data, other, (*borrowing, resolved))
        except RecipeError as err:
            raise RecipeError(f"{field}: {err}") from err
        if getattr(borrowed, name, None) is None:
            raise RecipeError(f"{field}: {other} has no {name} stage")
