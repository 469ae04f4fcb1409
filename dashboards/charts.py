"""The dashboard's charts: plotly figures built from the rows of `dashboards.queries`.

One colour per variant on every chart (`Palette`), titles carry units, legends name variants. A
chart function returns None when it has nothing to draw; the page then shows the panel's empty state.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import plotly.graph_objects as go

from dashboards.queries import (
    Band,
    CurvePoint,
    DropReason,
    FunnelStep,
    LossCurve,
    Score,
    SourceTokens,
    seed_band,
)

# Plotly's own qualitative palette (colour-blind friendlier than random picks), then D3's.
COLOURS = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880", "#FF97FF",
           "#FECB52", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
SOURCE_COLOURS = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#EECA3B", "#B279A2", "#FF9DA6")
HEIGHT = 420


class Palette:
    """Variant -> colour, fixed by the variant's place in the grid, so every panel agrees."""

    def __init__(self, variants: list[str]) -> None:
        self.colours = {variant: COLOURS[i % len(COLOURS)] for i, variant in enumerate(variants)}

    def __call__(self, variant: str) -> str:
        return self.colours[variant]

    def translucent(self, variant: str, alpha: float = 0.18) -> str:
        """The variant's colour for a seed band."""
        hex_colour = self.colours[variant].lstrip("#")
        r, g, b = (int(hex_colour[i:i + 2], 16) for i in (0, 2, 4))
        return f"rgba({r},{g},{b},{alpha})"


def _layout(fig: go.Figure, title: str, x_title: str, y_title: str, **extra: Any) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=extra.pop("height", HEIGHT),
                      template="plotly_white",
                      legend_title_text=extra.pop("legend", "variant"), margin={"t": 60, "l": 70, "r": 20, "b": 60},
                      font={"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif"}, **extra)
    return fig


def _ordered(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


# ---- 1. funnel -----------------------------------------------------------------------------------


def funnel_docs(steps: list[FunnelStep], palette: Palette) -> go.Figure | None:
    """Documents kept after each step, one line of bars per variant (steps in pipeline order)."""
    return _funnel_bars(steps, lambda s: s.docs, palette, "Documents kept after each step", "documents")


def funnel_bytes(steps: list[FunnelStep], palette: Palette) -> go.Figure | None:
    """Megabytes of text kept after each step (the funnel's byte counters; a stage's total from its documents)."""
    known = [s for s in steps if s.bytes is not None]
    return _funnel_bars(known, lambda s: s.bytes / 1e6, palette, "Text kept after each step (MB, UTF-8)", "megabytes")


def _funnel_bars(steps: list[FunnelStep], value: Callable[[FunnelStep], float], palette: Palette, title: str,
                 y_title: str) -> go.Figure | None:
    """Grouped bars of `value` per funnel step, one colour per variant; None when there is no step."""
    if not steps:
        return None
    fig = go.Figure()
    for variant in _ordered(s.variant for s in steps):
        mine = [s for s in steps if s.variant == variant]
        fig.add_bar(name=variant, x=[s.step for s in mine], y=[value(s) for s in mine], marker_color=palette(variant))
    order = _ordered(s.step for s in sorted(steps, key=_step_order))
    fig.update_xaxes(categoryorder="array", categoryarray=order, tickangle=-30)
    return _layout(fig, title, "step", y_title, barmode="group")


def _step_order(step: FunnelStep) -> tuple[int, str]:
    stage = step.step.split(":")[0]
    stage_rank = ("ingest", "curate", "dedup").index(stage)
    # a stage's own total comes after its steps
    return stage_rank, step.step if ":" in step.step else step.step + ":~"


def drop_reasons(reasons: list[DropReason], palette: Palette) -> go.Figure | None:
    """The reasons that removed the most documents, per variant (horizontal bars)."""
    if not reasons:
        return None
    fig = go.Figure()
    for variant in _ordered(r.variant for r in reasons):
        mine = [r for r in reasons if r.variant == variant]
        fig.add_bar(name=variant, y=[f"{r.stage}: {r.reason}" for r in mine], x=[r.docs for r in mine],
                    orientation="h", marker_color=palette(variant))
    fig.update_yaxes(autorange="reversed")
    height = max(HEIGHT, 28 * len(_ordered(f"{r.stage}: {r.reason}" for r in reasons)) + 120)
    return _layout(fig, "Top reasons documents were dropped (documents)", "documents dropped", "", barmode="group",
                   height=height)


# ---- 2. composition ------------------------------------------------------------------------------


def source_tokens(rows: list[SourceTokens]) -> go.Figure | None:
    """Training tokens per source, stacked per variant (colours name sources here, the x axis variants)."""
    if not rows:
        return None
    fig = go.Figure()
    variants = _ordered(r.variant for r in rows)
    for i, source in enumerate(_ordered(r.source for r in rows)):
        by_variant = {r.variant: r.train for r in rows if r.source == source}
        fig.add_bar(name=source, x=variants, y=[by_variant.get(v, 0) for v in variants],
                    marker_color=SOURCE_COLOURS[i % len(SOURCE_COLOURS)])
    return _layout(fig, "Training tokens per source (tokens)", "variant", "tokens", barmode="stack", legend="source")


def compression(values: dict[str, float], palette: Palette) -> go.Figure | None:
    """The tokenizer's bytes per token per variant (higher: fewer tokens for the same text)."""
    if not values:
        return None
    fig = go.Figure()
    for variant, value in values.items():
        fig.add_bar(name=variant, x=[variant], y=[value], marker_color=palette(variant), text=[f"{value:.2f}"],
                    textposition="outside")
    return _layout(fig, "Tokenizer compression (UTF-8 bytes per token)", "variant", "bytes per token")


# ---- 3. training ---------------------------------------------------------------------------------


def loss_curves(curves: list[LossCurve], palette: Palette) -> go.Figure | None:
    """Train (solid) and validation (dashed) loss against tokens seen; seeds as a min-max band."""
    if not curves:
        return None
    fig = go.Figure()
    for variant in _ordered(c.variant for c in curves):
        for split in ("train", "val"):
            mine = [c for c in curves if c.variant == variant and c.split == split]
            if mine:
                _add_band(fig, seed_band(mine), variant, split, palette)
    return _layout(fig, "Pretraining loss against tokens seen (cross-entropy, nats/token)", "tokens seen",
                   "loss (nats/token)", legend="variant, split")


def _add_band(fig: go.Figure, band: Band, variant: str, split: str, palette: Palette) -> None:
    name = f"{variant} {split}" + (f" (mean of {band.seeds} seeds)" if band.seeds > 1 else "")
    if band.seeds > 1:
        fig.add_scatter(x=band.x + band.x[::-1], y=band.high + band.low[::-1], fill="toself", mode="lines",
                        line={"width": 0}, fillcolor=palette.translucent(variant), hoverinfo="skip",
                        name=f"{variant} {split} seed range", legendgroup=f"{variant}-{split}", showlegend=False)
    fig.add_scatter(x=band.x, y=band.mean, mode="lines+markers" if split == "val" else "lines", name=name,
                    legendgroup=f"{variant}-{split}",
                    line={"color": palette(variant), "dash": "dash" if split == "val" else "solid"})


# ---- 4. evaluation -------------------------------------------------------------------------------


def score_bars(rows: list[Score], palette: Palette, title: str, y_title: str) -> go.Figure | None:
    """One group of bars per metric, one bar per variant, the seed spread (std) as error bars."""
    if not rows:
        return None
    fig = go.Figure()
    for variant in _ordered(r.variant for r in rows):
        mine = [r for r in rows if r.variant == variant]
        spread = any(len(r.values) > 1 for r in mine)
        fig.add_bar(name=variant, x=[r.metric for r in mine], y=[r.mean for r in mine], marker_color=palette(variant),
                    error_y={"type": "data", "array": [r.std for r in mine], "visible": spread},
                    hovertext=[f"{variant}: {r.mean:.4g} ± {r.std:.2g} over {len(r.values)} seed(s)" for r in mine],
                    hoverinfo="text")
    return _layout(fig, title, "metric", y_title, barmode="group")


def score_dots(rows: list[Score], palette: Palette, title: str, y_title: str) -> go.Figure | None:
    """Like `score_bars`, as dots on an axis fitted to the values: small gaps between large numbers stay visible."""
    if not rows:
        return None
    fig = go.Figure()
    for variant in _ordered(r.variant for r in rows):
        mine = [r for r in rows if r.variant == variant]
        fig.add_scatter(name=variant, x=[r.metric for r in mine], y=[r.mean for r in mine], mode="markers",
                        marker={"color": palette(variant), "size": 14},
                        error_y={"type": "data", "array": [r.std for r in mine], "visible": True})
    low, high = min(r.mean - r.std for r in rows), max(r.mean + r.std for r in rows)
    pad = max((high - low) * 0.25, abs(high) * 0.005, 1e-6)
    fig.update_yaxes(range=[low - pad, high + pad])
    return _layout(fig, title, "metric", y_title, scattermode="group")


# ---- 5. sample efficiency ------------------------------------------------------------------------


def sample_efficiency(points: list[CurvePoint], palette: Palette) -> list[go.Figure]:
    """Per fine-tuning task: its score against the fraction of training data, pretrained (solid) vs random (dotted)."""
    figures = []
    for task in _ordered(p.task for p in points):
        fig = go.Figure()
        mine = [p for p in points if p.task == task]
        for variant in _ordered(p.variant for p in mine):
            for init in _ordered(p.init for p in mine):
                line = sorted((p for p in mine if p.variant == variant and p.init == init), key=lambda p: p.fraction)
                fig.add_scatter(x=[p.fraction * 100 for p in line], y=[p.mean for p in line], mode="lines+markers",
                                name=f"{variant} {init}", line={"color": palette(variant),
                                                                "dash": "solid" if init == "pretrained" else "dot"})
        metric = mine[0].metric
        figures.append(_layout(fig, f"{task}: {metric} against training data used (%)", "training data (%)", metric,
                               legend="variant, init"))
    return figures
