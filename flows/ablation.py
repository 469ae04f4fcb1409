"""Ablation grids: one base recipe, named variants that each change a few values, optional seeds.

```yaml
name: demo
base: configs/demo.yaml
overrides: {pretrain.max_tokens: 600000, pretrain.max_steps: null}   # every variant (an equal budget)
variants:
  raw: {curate: null, dedup: null}
  curated: {dedup: null}
  curated_dedup: {}
seeds: [1337, 7]
```

Overrides use the `--set` paths (`curate: null` turns a stage off). Every (variant, seed) becomes a
full recipe whose `ablation` field names it; variants share every stage whose fingerprint is equal.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from flows.plan import PlannedStage, make_plan
from flows.recipe import (PipelineConfig, RecipeError, apply_values, format_validation_error,
                          read_yaml_mapping, validate_recipe)
from storage.configbase import StrictModel
from storage.workspace import Workspace

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


class Grid(StrictModel):
    """An ablation grid file (`configs/ablations/*.yaml`)."""

    name: str = Field(pattern=NAME_PATTERN)
    base: str = Field(description="the recipe every variant starts from")
    overrides: dict[str, Any] = Field({}, description="applied to every variant first (e.g. an equal token budget)")
    variants: dict[str, dict[str, Any]] = Field(description="variant name -> {dot.path: value}")
    seeds: list[int] | None = Field(None, description="each variant runs once per seed (default: the base seed)")

    @field_validator("variants")
    @classmethod
    def _named_variants(cls, variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not variants:
            raise ValueError("a grid needs at least one variant")
        import re

        bad = [name for name in variants if not re.match(NAME_PATTERN, name)]
        if bad:
            raise ValueError(f"variant names {bad} may only use letters, digits, '_', '.', '-'")
        return variants

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
            raise ValueError("seeds must be a non-empty list of distinct integers")
        return seeds


@dataclass(frozen=True)
class Variant:
    """One (variant, seed) of a grid, as a complete recipe."""

    name: str
    seed: int
    config: PipelineConfig

    @property
    def label(self) -> str:
        return f"{self.name}/seed={self.seed}"


def is_grid_file(path: str | Path) -> bool:
    """A YAML mapping with `variants` is a grid; anything else is read as a recipe."""
    try:
        return "variants" in read_yaml_mapping(path)
    except RecipeError:
        return False


def load_grid(path: str | Path) -> Grid:
    try:
        return Grid.model_validate(read_yaml_mapping(path, "grid"))
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, str(path))) from err


def expand(grid: Grid) -> list[Variant]:
    """Every (variant, seed) as a validated recipe, in the grid's order; errors name the variant."""
    try:
        base = read_yaml_mapping(grid.base)
    except RecipeError as err:
        raise RecipeError(f"grid {grid.name}: base: {err}") from err
    seeds = grid.seeds or [base.get("seed", PipelineConfig.model_fields["seed"].default)]
    variants = []
    for position, (name, overrides) in enumerate(grid.variants.items()):
        for seed in seeds:
            variants.append(Variant(name, seed, variant_recipe(grid, base, name, position, overrides, seed)))
    return variants


def variant_recipe(grid: Grid, base: dict[str, Any], name: str, position: int, overrides: dict[str, Any],
                   seed: int) -> PipelineConfig:
    for key, value in overrides.items():
        dropped = [g for g in grid.overrides if g.startswith(f"{key}.")]
        if dropped and value is not None:       # (a stage turned off takes its settings with it)
            raise RecipeError(f"grid {grid.name}, variant {name}: {key!r} replaces the whole section, which drops "
                              f"the grid's overrides {dropped} meant for every variant; set {key}.<field> paths "
                              "instead")
    merged = {**grid.overrides, **overrides}
    data = apply_values(base, merged, f"{grid.name} variant {name}: ")
    suffix = f"-s{seed}" if grid.seeds and len(grid.seeds) > 1 else ""
    data.update(name=f"{grid.name}-{name}{suffix}", seed=seed,
                ablation={"grid": grid.name, "variant": name, "position": position, "seed": seed, "overrides": merged})
    return validate_recipe(data, f"{grid.base} (grid {grid.name}, variant {name})")


def write_variant_recipes(grid: Grid, variants: list[Variant], ws: Workspace) -> dict[str, Path]:
    """Each variant's full recipe as JSON under `<workspace>/ablations/<grid>/`: what `lmforge run` reruns."""
    from flows.compare import write_members

    folder = ws.root / "ablations" / grid.name
    folder.mkdir(parents=True, exist_ok=True)
    write_members(ws, grid.name, [(variant.name, variant.seed) for variant in variants])
    paths = {}
    for variant in variants:
        path = folder / f"{variant.config.name}.json"
        path.write_text(json.dumps(variant.config.model_dump(mode="json", exclude_none=True), indent=2) + "\n")
        paths[variant.label] = path
    return paths


@dataclass(frozen=True)
class GridPlanRow:
    variant: str
    stage: str
    fingerprint: str
    status: str
    shared_with: tuple[str, ...]       # the other variants that need the same output


def plan_grid(variants: list[Variant], ws: Workspace) -> list[GridPlanRow]:
    """Per variant and stage: fingerprint, cached or pending, and which other variants share it."""
    plans = {variant.label: [s for s in make_plan(variant.config, ws) if s.fingerprint] for variant in variants}
    users: dict[tuple[str, str], list[str]] = {}
    for label, stages in plans.items():
        for stage in stages:
            users.setdefault((stage.name, stage.fingerprint), []).append(label)
    return [_plan_row(label, stage, users) for label, stages in plans.items() for stage in stages]


def _plan_row(label: str, stage: PlannedStage, users: dict[tuple[str, str], list[str]]) -> GridPlanRow:
    others = tuple(u for u in users[(stage.name, stage.fingerprint)] if u != label)
    return GridPlanRow(label, stage.name, stage.fingerprint, stage.status, others)


def format_grid_plan(rows: list[GridPlanRow]) -> str:
    """A plain table: variant, stage, fingerprint, status, shared with."""
    lines = [f"{'variant':<28} {'stage':<10} {'fingerprint':<13} {'status':<8} shared with"]
    for row in rows:
        shared = ", ".join(row.shared_with[:3]) if row.shared_with else "-"
        if len(row.shared_with) > 3:
            shared += f" (+{len(row.shared_with) - 3} more)"
        lines.append(f"{row.variant:<28} {row.stage:<10} {row.fingerprint:<13} {row.status:<8} {shared}")
    distinct = len({(r.stage, r.fingerprint) for r in rows})
    lines.append(f"({len(rows)} stage runs, {distinct} distinct outputs)")
    return "\n".join(lines)

