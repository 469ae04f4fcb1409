"""Recipes: YAML validated by the pipeline config, with `--set a.b=value` overrides."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from flows.stages import PIPELINE_ORDER, STAGES, StageConfigs, input_stages


class PipelineConfig(StageConfigs):
    """A whole pipeline: a name, a seed, and one config per stage (a stage left out does not run)."""

    name: str = Field("lmforge", pattern=r"^[A-Za-z0-9_.-]+$")
    experiment: str = Field("lmforge", description="MLflow experiment that holds the runs")
    seed: int = 1337

    @model_validator(mode="after")
    def _inputs_available(self) -> "PipelineConfig":
        enabled = self.enabled_stages()
        for name in enabled:
            input_stages(STAGES[name], enabled)   # raises naming the stage and the missing input
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
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of `data` with every `a.b=value` applied (list items addressed by index)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node: Any = data
        for i, key in enumerate(path[:-1]):
            node = _child(node, key, path[: i + 1], item)
        _assign(node, path[-1], value, item)
    return data


def _child(node: Any, key: str, walked: list[str], item: str) -> Any:
    if isinstance(node, list):
        return node[_index(key, node, item)]
    if not isinstance(node, dict):
        raise RecipeError(f"--set {item!r}: {'.'.join(walked[:-1])} is not a mapping")
    if node.get(key) is None:
        node[key] = {}
    return node[key]


def _assign(node: Any, key: str, value: Any, item: str) -> None:
    if isinstance(node, list):
        node[_index(key, node, item)] = value
    elif isinstance(node, dict):
        node[key] = value
    else:
        raise RecipeError(f"--set {item!r}: cannot set {key!r} inside a {type(node).__name__}")


def _index(key: str, node: list, item: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise RecipeError(f"--set {item!r}: {key!r} is not an index of a list of {len(node)}")
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


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Reads, overrides and validates a recipe; raises RecipeError naming the file and field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise RecipeError(f"{path}: cannot read recipe: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of stage names to configs")
    data.setdefault("name", path.stem)
    try:
        return PipelineConfig.model_validate(apply_overrides(data, overrides or []))
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, str(path))) from err
