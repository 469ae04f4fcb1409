"""One self-contained HTML page: the verdict, then six panels, plotly's JavaScript inlined (no network).

A panel with data shows its charts; one without shows why (`<p class="empty">`): "no evaluate stage
in this run", never a blank chart.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import UTC, datetime

import plotly.graph_objects as go

from dashboards import charts, queries
from dashboards.queries import Score, Selection
from dashboards.verdict import verdict_html

# Nothing on the page may reach the network: scripts and styles are inline, images data: URIs.
CSP = ("default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
       "img-src data:; font-src data:")
PLOT_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png"}}
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; background: #f6f7f9;
       color: #1d232b; }
main { max-width: 1240px; margin: 0 auto; padding: 16px 20px 48px; }
h1 { font-size: 1.6em; margin: 8px 0 4px; } h2 { margin: 0 0 6px; font-size: 1.25em; }
.sub { color: #5b6570; margin: 0 0 12px; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 14px 18px; margin: 14px 0; }
.verdict { border-left: 6px solid #2b8a3e; } .verdict p { margin: 6px 0; }
.note { color: #5b6570; font-size: 0.92em; margin: 4px 0 8px; }
.empty { color: #7a4d00; background: #fff8e6; border: 1px dashed #e0b44c; padding: 14px; border-radius: 6px; }
.chart { min-height: 420px; }
table { border-collapse: collapse; font-size: 0.9em; margin: 6px 0 12px; }
th, td { border-bottom: 1px solid #e3e6ea; padding: 4px 10px; text-align: left; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 5px; }
.scroll { overflow-x: auto; }
code { background: #f0f2f4; padding: 0 3px; border-radius: 3px; }
"""


@dataclass
class Panel:
    """A titled section: charts and HTML fragments, or the sentence that says why it is empty."""

    key: str
    title: str
    figures: list[go.Figure] = field(default_factory=list)
    fragments: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    empty: str | None = None


def build_page(selection: Selection, mlflow_url: str | None = None) -> str:
    """The whole dashboard as one HTML string."""
    palette = charts.Palette(selection.variants)
    panels = [funnel_panel(selection, palette), composition_panel(selection, palette),
              training_panel(selection, palette), evaluation_panel(selection, palette),
              efficiency_panel(selection, palette), facts_panel(selection, palette, mlflow_url)]
    return _document(selection, palette, panels)


# ---- the panels ----------------------------------------------------------------------------------


def funnel_panel(selection: Selection, palette: charts.Palette) -> Panel:
    panel = Panel("funnel", "1. Curation funnel")
    if not any(selection.has(stage) for stage in ("ingest", "curate", "dedup")):
        panel.empty = "no ingest, curate or dedup stage in this run"
        return panel
    steps = queries.funnel(selection)
    panel.figures = [f for f in (charts.funnel_docs(steps, palette), charts.funnel_bytes(steps, palette),
                                 charts.drop_reasons(queries.drop_reasons(selection), palette)) if f is not None]
    if not selection.has("curate"):
        panel.notes.append("no curate stage in this run: documents go from ingest straight to the next stage")
    missing = queries.missing_byte_counters(selection)
    if missing:
        panel.notes.append(f"no byte counters in {', '.join(missing)} (built before the funnel counted bytes): "
                           "their steps show documents only; bytes after each stage come from its documents.")
    return panel


def composition_panel(selection: Selection, palette: charts.Palette) -> Panel:
    panel = Panel("composition", "2. Data composition")
    figures = [charts.source_tokens(queries.tokens_by_source(selection)),
               charts.compression(queries.bytes_per_token(selection), palette)]
    panel.figures = [f for f in figures if f is not None]
    if not panel.figures:
        panel.empty = "no shard or tokenizer stage in this run"
    elif not selection.has("shard"):
        panel.notes.append("no shard stage in this run: tokens per source are unknown")
    return panel


def training_panel(selection: Selection, palette: charts.Palette) -> Panel:
    panel = Panel("training", "3. Training")
    if not selection.has("pretrain"):
        panel.empty = "no pretrain stage in this run"
        return panel
    figure = charts.loss_curves(queries.loss_curves(selection), palette)
    if figure is None:
        panel.empty = "the pretrain outputs have no metrics.jsonl with loss and tokens seen"
        return panel
    panel.figures = [figure]
    panel.notes.append("Solid: training loss; dashed: validation loss on each variant's own validation split "
                       "(different data per variant, so compare shapes here and scores in the evaluation panel). "
                       "Shaded: the range over seeds.")
    return panel


def evaluation_panel(selection: Selection, palette: charts.Palette) -> Panel:
    panel = Panel("evaluation", "4. Evaluation")
    if not selection.has("evaluate") and not selection.has("finetune"):
        panel.empty = "no evaluate stage in this run, and no finetune stage"
        return panel
    _evaluate_charts(panel, selection, palette)
    _finetune_charts(panel, selection, palette)
    return panel


def _evaluate_charts(panel: Panel, selection: Selection, palette: charts.Palette) -> None:
    if not selection.has("evaluate"):
        panel.notes.append("no evaluate stage in this run (zero-shot scores, bits per byte)")
        return
    headline = queries.scores(selection, "evaluate")
    bpb = [s for s in headline if s.metric.endswith("/bpb")]
    aggregate = [s for s in headline if s.metric.startswith("aggregate/")]
    tasks = queries.task_scores(selection, "evaluate")
    figures = [charts.score_bars(aggregate + tasks, palette, "Zero/few-shot scores (aggregate: centered, 0 = chance;"
                                 " tasks: accuracy)", "score"),
               charts.score_dots(bpb, palette, "Held-out bits per byte (lower is better; bars: seed std)",
                                 "bits per byte")]
    panel.figures += [f for f in figures if f is not None]


def _finetune_charts(panel: Panel, selection: Selection, palette: charts.Palette) -> None:
    if not selection.has("finetune"):
        panel.notes.append("no finetune stage in this run (GLUE, SQuAD EM/F1)")
        return
    squad = [s for s in queries.scores(selection, "finetune")
             if s.metric.rsplit("/", 1)[-1] in ("exact", "f1") and _is_squad(s)]
    others = [s for s in queries.task_scores(selection, "finetune") if not _is_squad(s)]
    figures = [charts.score_bars(others, palette, "Fine-tuning scores (each task's official metric)", "score"),
               charts.score_bars(squad, palette, "SQuAD exact match and F1 (%)", "score (%)")]
    panel.figures += [f for f in figures if f is not None]
    for variant, table in queries.glue_tables(selection).items():
        panel.fragments.append(f"<h3>GLUE: {html.escape(variant)}</h3>{markdown_table(table)}")


def _is_squad(score: Score) -> bool:
    return "squad" in score.metric.split("/", 1)[0].lower()


def efficiency_panel(selection: Selection, palette: charts.Palette) -> Panel:
    panel = Panel("efficiency", "5. Sample efficiency")
    if not selection.has("finetune"):
        panel.empty = "no finetune stage in this run"
        return panel
    panel.figures = charts.sample_efficiency(queries.sample_efficiency(selection), palette)
    if not panel.figures:
        panel.empty = "no fine-tuning task has a sample_efficiency curve (finetune.tasks[].sample_efficiency)"
    return panel


def facts_panel(selection: Selection, palette: charts.Palette, mlflow_url: str | None) -> Panel:
    panel = Panel("facts", "6. Run facts")
    facts = queries.stage_facts(selection)
    if not facts:
        panel.empty = "no stage ran in this run"
        return panel
    panel.fragments.append(_facts_table(selection, facts, palette, mlflow_url))
    return panel


# ---- HTML ----------------------------------------------------------------------------------------


def _facts_table(selection: Selection, facts: list[queries.StageFact], palette: charts.Palette,
                 mlflow_url: str | None) -> str:
    rows = []
    for fact in facts:
        wall = f"{fact.wall_s:,.1f}" if fact.wall_s is not None else ""
        rows.append(f"<tr><td>{_swatch(palette, fact.variant)}{html.escape(fact.variant)}</td><td>{fact.seed}</td>"
                    f"<td>{fact.stage}</td><td><code>{fact.fingerprint}</code></td>"
                    f"<td>{'cached' if fact.cached else 'built'}</td><td class='num'>{wall}</td>"
                    f"<td class='num'>{fact.throughput}</td>"
                    f"<td>{_mlflow_link(mlflow_url, fact.mlflow_run_id)}</td>"
                    f"<td>{_mlflow_link(mlflow_url, fact.pipeline_mlflow_run_id)}</td></tr>")
    head = ("<tr><th>variant</th><th>seed</th><th>stage</th><th>fingerprint</th><th>status</th><th>wall (s)</th>"
            "<th>throughput</th><th>MLflow stage run</th><th>MLflow pipeline run</th></tr>")
    note = (f"<p class='note'>MLflow links open the UI at {html.escape(mlflow_url)} (start it with "
            "<code>lmforge ui</code>).</p>" if mlflow_url else "")
    return f"{note}<div class='scroll'><table>{head}{''.join(rows)}</table></div>"


def _mlflow_link(base: str | None, run_id: str | None) -> str:
    if not run_id:
        return ""
    if not base:
        return f"<code>{run_id[:12]}</code>"
    return f"<a href='{html.escape(base)}/#/runs/{run_id}'>{run_id[:12]}</a>"


def _swatch(palette: charts.Palette, variant: str) -> str:
    return f"<span class='swatch' style='background:{palette(variant)}'></span>"


def markdown_table(text: str) -> str:
    """A Markdown pipe table (as finetune writes the GLUE table) as an HTML table; other lines as notes."""
    rows, notes = [], []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.strip().startswith("|"):
            notes.append(html.escape(line)) if line.strip() else None
        elif not all(set(c) <= set("-: ") for c in cells):
            tag = "th" if not rows else "td"
            rows.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
    lead = "".join(f"<p class='note'>{n}</p>" for n in notes)
    return f"{lead}<div class='scroll'><table>{''.join(rows)}</table></div>"


def _panel_html(panel: Panel) -> str:
    body = [f"<h2>{html.escape(panel.title)}</h2>"]
    if panel.empty:
        body.append(f"<p class='empty'>{html.escape(panel.empty)}</p>")
    body += [f"<p class='note'>{html.escape(note)}</p>" for note in panel.notes]
    body += [f"<div class='chart'>{_figure_html(fig, f'{panel.key}-{i}')}</div>" for i, fig in enumerate(panel.figures)]
    body += panel.fragments
    return f"<section id='{panel.key}' data-panel='{panel.key}'>{''.join(body)}</section>"


def _figure_html(fig: go.Figure, div_id: str) -> str:
    """The chart's div and script; a fixed id (plotly's default is random) keeps the page reproducible."""
    return fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False, config=PLOT_CONFIG,
                       div_id=f"chart-{div_id}",
                       default_width="100%", default_height=f"{fig.layout.height or charts.HEIGHT}px")


def _document(selection: Selection, palette: charts.Palette, panels: list[Panel]) -> str:
    from plotly.offline import get_plotlyjs

    built = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    legend = " ".join(f"{_swatch(palette, v)}{html.escape(v)}" for v in selection.variants)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lmforge: {html.escape(selection.title)}</title>
<style>{STYLE}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body><main>
<h1>lmforge: {html.escape(selection.title)}</h1>
<p class="sub">workspace {html.escape(str(selection.workspace.root))} &middot; built {built} &middot; variants: {legend}</p>
{verdict_html(selection, palette)}
{''.join(_panel_html(panel) for panel in panels)}
</main></body></html>
"""
