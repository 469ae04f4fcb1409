"""The top of the page: which variant won on the judged score, and what its data looked like.

The judged score is the first the runs have of: held-out bits per byte (lower is better; comparable
across tokenizers), the evaluate stage's centered aggregate (higher is better), or pretrain's final
validation loss (lower is better, with a warning: each variant has its own validation split).
"""
from __future__ import annotations

import html
from dataclasses import dataclass

from dashboards.charts import Palette
from dashboards.queries import RunRef, Selection
from flows.compare import Cell


@dataclass(frozen=True)
class Judge:
    metric: str            # "evaluate/heldout/wikitext-2_test/bpb", ...
    label: str             # "bits per byte on wikitext-2_test"
    lower_is_better: bool
    caveat: str = ""


@dataclass(frozen=True)
class Standing:
    variant: str
    mean: float
    std: float
    seeds: int


def choose_judge(selection: Selection) -> Judge | None:
    """The score the variants are ranked by (see the module docstring), or None when no run has one."""
    names = {f"{ref.stage}/{name}" for run in selection.runs for ref in run.stages.values() for name in ref.stats}
    bpb = sorted(n for n in names if n.startswith("evaluate/heldout/") and n.endswith("/bpb"))
    if bpb:
        return Judge(bpb[0], f"bits per byte on {bpb[0].split('/')[2]}", True)
    if "evaluate/aggregate/core" in names:
        return Judge("evaluate/aggregate/core", "centered zero-shot aggregate", False)
    if "pretrain/final_val_loss" in names:
        return Judge("pretrain/final_val_loss", "final validation loss", True,
                     "each variant is scored on its own validation split; add an evaluate stage for a fair judge")
    return None


def standings(selection: Selection, judge: Judge) -> list[Standing]:
    """Variants from best to worst on the judged score (mean over seeds)."""
    stage, name = judge.metric.split("/", 1)
    values: dict[str, list[float]] = {}
    for run in selection.runs_with(stage):
        if name in run.stages[stage].stats:
            values.setdefault(run.variant, []).append(run.stages[stage].stats[name])
    rows = [Standing(v, Cell(xs).mean, Cell(xs).std, len(xs)) for v, xs in values.items()]
    return sorted(rows, key=lambda s: s.mean if judge.lower_is_better else -s.mean)


def data_facts(run: RunRef) -> dict[str, float | None]:
    """What the variant trained on: documents kept, training tokens, epochs over them, bytes per token."""
    def stat(stage: str, name: str) -> float | None:
        return run.stages[stage].stats.get(name) if stage in run.stages else None

    last_doc_stage = next((s for s in ("dedup", "curate", "ingest") if s in run.stages), None)
    return {"documents kept": stat(last_doc_stage, "docs_out") if last_doc_stage else None,
            "training tokens": stat("shard", "tokens_train"), "epochs": stat("pretrain", "epochs"),
            "bytes per token": stat("tokenizer", "bytes_per_token")}


def verdict_html(selection: Selection, palette: Palette) -> str:
    """The verdict section: the winner in one sentence, then every variant's score and data side by side."""
    judge = choose_judge(selection)
    if judge is None:
        return ("<section class='verdict' id='verdict'><h2>Verdict</h2><p class='empty'>no score to judge by in "
                "this run: no evaluate stage and no pretrain stage</p></section>")
    ranked = standings(selection, judge)
    sentence = headline_sentence(judge, ranked)
    caveat = f"<p class='note'>{html.escape(judge.caveat)}</p>" if judge.caveat else ""
    return (f"<section class='verdict' id='verdict'><h2>Verdict</h2><p>{sentence}</p>"
            f"{why_html(selection, ranked)}{caveat}{_missing_html(selection, judge)}"
            f"{_table(selection, judge, ranked, palette)}</section>")


def _missing_html(selection: Selection, judge: Judge) -> str:
    """The seeds left out of the judged score because their stage has no current output (a partial rerun)."""
    stage = judge.metric.split("/", 1)[0]
    gone = [f"{run.variant} seed {run.seed}" for run in selection.runs if stage in run.missing]
    if not gone:
        return ""
    return (f"<p class='note'>Not scored: {html.escape(', '.join(gone))} (no current {stage} output: none was built "
            "from its current upstream since a partial rerun).</p>")


def leaders(ranked: list[Standing]) -> list[Standing]:
    """The variants tied for first (the same score to 1e-9: e.g. a dedup that removed nothing)."""
    best = ranked[0].mean
    return [s for s in ranked if abs(s.mean - best) <= 1e-9 * max(1.0, abs(best))]


def headline_sentence(judge: Judge, ranked: list[Standing]) -> str:
    top = leaders(ranked)
    names = " and ".join(f"<strong>{html.escape(s.variant)}</strong>" for s in top)
    direction = "lower" if judge.lower_is_better else "higher"
    verb = "wins" if len(top) == 1 else "tie for first"
    text = f"{names} {verb} on {html.escape(judge.label)} ({direction} is better): {top[0].mean:.4g}"
    if len(ranked) > len(top):
        best, runner = top[0], ranked[len(top)]
        change = (best.mean - runner.mean) / abs(runner.mean) * 100 if runner.mean else 0.0
        text += f" vs {runner.mean:.4g} for {html.escape(runner.variant)} ({change:+.1f}%)"
        text += _noise(best, runner)
    return text + "."


def _noise(best: Standing, runner: Standing) -> str:
    """How the gap compares with the seed spread (within 2 standard deviations: not a clear win)."""
    if max(best.seeds, runner.seeds) < 2:
        return "; one seed, so the seed noise is unknown"
    gap, spread = abs(best.mean - runner.mean), max(best.std, runner.std)
    if not spread:
        return f", over {best.seeds} seeds"
    clear = "a clear gap" if gap >= 2 * spread else "within seed noise"
    return f"; the gap is {gap / spread:.1f}x the seed spread ({clear}, {best.seeds} seeds)"


def why_html(selection: Selection, ranked: list[Standing]) -> str:
    """The data behind the result: the winner's documents, tokens and epochs against the runner-up's."""
    top = leaders(ranked)
    if len(ranked) <= len(top):
        return ""
    winner, loser = top[0], ranked[len(top)]
    first = {run.variant: run for run in reversed(selection.runs)}
    best, runner = data_facts(first[winner.variant]), data_facts(first[loser.variant])
    parts = [f"{name} {_fmt(best[name])} vs {_fmt(runner[name])}" for name in best
             if best[name] is not None and runner[name] is not None and best[name] != runner[name]]
    if not parts:
        return ""
    return (f"<p>Why: {html.escape(winner.variant)} trained with " + "; ".join(parts)
            + f" (against {html.escape(loser.variant)}).</p>")


def _table(selection: Selection, judge: Judge, ranked: list[Standing], palette: Palette) -> str:
    first_run = {}
    for run in selection.runs:
        first_run.setdefault(run.variant, run)
    keys = list(data_facts(selection.runs[0]))
    head = "".join(f"<th>{k}</th>" for k in ["rank", "variant", "what it changes", judge.label, *keys])
    common = common_overrides(list(first_run.values()))
    rows = [_row(i + 1, s, first_run[s.variant], common, palette) for i, s in enumerate(ranked)]
    return f"<div class='scroll'><table><tr>{head}</tr>{''.join(rows)}</table></div>"


def _row(rank: int, standing: Standing, run: RunRef, common: set[str], palette: Palette) -> str:
    changes = ", ".join(f"{k}: {'off' if v is None else v}" for k, v in run.overrides.items() if k not in common) or "-"
    score = f"{standing.mean:.4g}" + (f" ± {standing.std:.2g}" if standing.seeds > 1 else "")
    facts = "".join(f"<td class='num'>{_fmt(v)}</td>" for v in data_facts(run).values())
    swatch = f"<span class='swatch' style='background:{palette(standing.variant)}'></span>"
    return (f"<tr><td>{rank}</td><td>{swatch}{html.escape(standing.variant)}</td><td>{html.escape(changes)}</td>"
            f"<td class='num'>{score}</td>{facts}</tr>")


def common_overrides(runs: list[RunRef]) -> set[str]:
    """Overrides every variant sets alike are the grid's common settings (the budget), not what a variant changes."""
    if len(runs) < 2:
        return set()
    first = runs[0].overrides
    return {k for k, v in first.items() if all(run.overrides.get(k, object()) == v for run in runs[1:])}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{int(value):,}" if value == int(value) and abs(value) >= 10 else f"{value:.3g}"
