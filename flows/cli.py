"""The `lmforge` command line: run, plan, demo, catalog, ablate, compare, dashboard, ui."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from storage.telemetry import disable_telemetry

disable_telemetry()

app = typer.Typer(help="lmforge: raw text in, curated data, tokenizers, token shards and trained models out.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

REPO_ROOT = Path(__file__).resolve().parents[1]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="stream every stage's output, and tracebacks of stage errors")]
WorkspaceOpt = Annotated[Optional[Path], typer.Option("--workspace", "-w", help="workspace directory "
                         "(default: $LMFORGE_WORKSPACE or ./workspace)", show_default=False)]


def _split(values: list[str] | None) -> list[str] | None:
    """`--only a,b --only c` -> ['a', 'b', 'c']."""
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _load(recipe: Path, overrides: list[str] | None):
    from flows.ablation import is_grid_file
    from flows.recipe import RecipeError, load_recipe

    if is_grid_file(recipe):
        _fail(f"{recipe} is an ablation grid (it has `variants`): run it with `lmforge ablate {recipe}`")
    try:
        return load_recipe(recipe, overrides or [])
    except RecipeError as err:
        _fail(str(err))


def _quiet_user_errors() -> None:
    """A StageError is the user's to fix and the CLI prints it in one line: Prefect must not add tracebacks."""
    import logging

    from storage.stage import StageError

    def keep(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, StageError) and "StageError" not in record.getMessage()

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(keep)


def _sigterm_to_exit() -> None:
    """SIGTERM unwinds like Ctrl-C, so runs end KILLED in the catalog and MLflow, never stuck RUNNING."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


@app.command()
def run(recipe: Annotated[Path, typer.Argument(help="YAML recipe, e.g. configs/demo.yaml")],
        workspace: WorkspaceOpt = None,
        only: Annotated[Optional[list[str]], typer.Option(help="run only these stages (comma-separated)")] = None,
        until: Annotated[Optional[str], typer.Option(help="stop after this stage")] = None,
        force: Annotated[Optional[list[str]], typer.Option(help="recompute these stages even if cached")] = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe value: a.b=value")] = None,
        verbose: VerboseOpt = False,
        ) -> None:
    """Run a recipe: every stage whose output is not already in the workspace."""
    config = _load(recipe, set_)
    _run_pipeline(config, workspace, _split(only), until, _split(force), verbose)


def _run_pipeline(config, workspace: Path | None, only, until, force, verbose: bool = False) -> None:
    from storage.workspace import resolve_workspace

    ws = resolve_workspace(workspace)
    _attach_ui(ws)                      # before Prefect is imported: it reads PREFECT_API_URL once
    from flows.pipeline import StageSelectionError, pipeline
    from flows.recipe import RecipeError
    from storage.stage import StageError

    _open_terminal(verbose)
    try:
        outcomes = pipeline(config=config, workspace=str(ws), only=only, until=until, force=force)
    except (StageSelectionError, StageError, RecipeError) as err:
        _fail(str(err), code=1)
    _closing_summary(ws, outcomes, config.experiment)


def _attach_ui(ws: Path) -> None:
    """Report to the Prefect server of a `lmforge ui` running for this workspace, if there is one."""
    from flows.ui import UIError, attach

    try:
        url = attach(ws)
    except UIError as err:
        _fail(str(err), code=1)
    if url:
        typer.echo(f"Prefect: {url} (runs appear in its UI)")


def _open_terminal(verbose: bool) -> None:
    """One live line per stage (their output into log files), unless -v streams everything."""
    import logging

    from flows import terminal

    _sigterm_to_exit()
    if not verbose:
        _quiet_user_errors()
        # "creating database tables..." and the like: MLflow sets its level from this when it is imported
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    terminal.activate(terminal.Terminal(verbose))


def _closing_summary(ws: Path, outcomes: list[dict], experiment: str) -> None:
    """Where everything landed, and where to look next."""
    typer.echo(f"\nworkspace: {ws}")
    for item in outcomes:
        typer.echo(f"  {item['stage']:<10} {item['fingerprint']}  {'cached' if item['cached'] else 'built ':<7} "
                   f"{item['output_dir']}")
    if outcomes:
        run_id, mlflow_run = outcomes[0]["run_id"], outcomes[0]["mlflow_run_id"]
        typer.echo(f"\nlogs:    {ws / 'logs' / run_id}/<stage>.log")
        typer.echo(f"catalog: lmforge catalog \"select stage, cached, wall_s from stage_runs where run_id = "
                   f"'{run_id}'\" -w {ws}")
        typer.echo(f"UIs:     lmforge ui -w {ws}   (MLflow experiment {experiment!r}, run {mlflow_run})")


@app.command()
def plan(recipe: Annotated[Path, typer.Argument(help="YAML recipe, or an ablation grid")],
         workspace: WorkspaceOpt = None,
         set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe value: a.b=value")] = None,
         ) -> None:
    """Show every stage with its fingerprint and status (cached, pending, not in recipe); runs nothing.

    For an ablation grid: every variant's stages, and which other variants share each output."""
    from flows.ablation import is_grid_file
    from flows.plan import make_plan
    from storage.workspace import Workspace, resolve_workspace

    if is_grid_file(recipe):
        if set_:
            _fail(f"--set applies to a recipe; {recipe} is an ablation grid: change its `overrides` or `variants`")
        _plan_grid(recipe, Workspace(resolve_workspace(workspace)))
        return
    from flows.recipe import RecipeError

    config = _load(recipe, set_)
    try:
        stages = make_plan(config, Workspace(resolve_workspace(workspace)))
    except RecipeError as err:
        _fail(str(err))
    typer.echo(f"{'stage':<10} {'fingerprint':<13} status")
    for stage in stages:
        typer.echo(f"{stage.name:<10} {stage.fingerprint or '-':<13} {stage.status}")


def _plan_grid(path: Path, ws) -> None:
    from flows.ablation import expand, format_grid_plan, load_grid, plan_grid
    from flows.recipe import RecipeError

    try:
        typer.echo(format_grid_plan(plan_grid(expand(load_grid(path)), ws)))
    except RecipeError as err:
        _fail(str(err))


@app.command()
def ablate(grid: Annotated[Path, typer.Argument(help="ablation grid, e.g. configs/ablations/demo.yaml")],
           workspace: WorkspaceOpt = None,
           max_parallel: Annotated[int, typer.Option(min=1, help="variants running at once (processes)")] = 1,
           verbose: VerboseOpt = False) -> None:
    """Run every variant of an ablation grid (stages they share are built once), then print the comparison."""
    from flows.ablation import expand, load_grid
    from flows.compare import render
    from flows.recipe import RecipeError, read_yaml_mapping
    from storage.stage import StageError
    from storage.workspace import resolve_workspace

    try:
        if "variants" not in read_yaml_mapping(grid, "grid"):
            _fail(f"{grid} is not an ablation grid (it has no `variants`); a recipe runs with `lmforge run {grid}`")
        spec = load_grid(grid)
        expand(spec)            # every variant is a valid recipe before any work starts
    except RecipeError as err:
        _fail(str(err))
    _attach_ui(resolve_workspace(workspace))
    _open_terminal(verbose)
    from flows.ablate import ablation
    from flows.compare import compare_grid
    from storage.workspace import Workspace

    try:
        ablation(grid=spec, workspace=str(resolve_workspace(workspace)), max_parallel=max_parallel)
    except (StageError, RecipeError) as err:
        _fail(str(err), code=1)
    typer.echo(render(compare_grid(Workspace(resolve_workspace(workspace)), spec.name), "table"))
    typer.echo(f"\nagain any time: lmforge compare {spec.name} [--format markdown|csv|json]; the MLflow runs are "
               f"tagged lmforge.ablation={spec.name} (lmforge ui)")


@app.command()
def compare(grid: Annotated[str, typer.Argument(help="the grid's name (its `name:` field)")],
            workspace: WorkspaceOpt = None,
            fmt: Annotated[str, typer.Option("--format", help="table, csv, json or markdown")] = "table") -> None:
    """The variant x metric table of an ablation grid: every stage's headline numbers, mean ± std over seeds."""
    from flows.compare import FORMATS, NoSuchGridError, compare_grid, render, write_parquet
    from storage.workspace import Workspace, resolve_workspace

    if fmt not in FORMATS:
        _fail(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    ws = Workspace(resolve_workspace(workspace))
    if not ws.catalog_path.is_file():
        _fail(f"no catalog at {ws.catalog_path}: run `lmforge ablate` first, or pass --workspace")
    try:
        table = compare_grid(ws, grid)
    except NoSuchGridError as err:
        _fail(str(err), code=1)
    write_parquet(ws, table)
    typer.echo(render(table, fmt))


@app.command()
def dashboard(grid: Annotated[Optional[str], typer.Argument(help="an ablation grid's name (default: the latest "
                                                             "pipeline run)")] = None,
              workspace: WorkspaceOpt = None,
              out: Annotated[Optional[Path], typer.Option(help="where to write the page (default: "
                             "ablations/<grid>/dashboard.html or dashboards/latest.html in the workspace)")] = None,
              serve_: Annotated[bool, typer.Option("--serve", help="serve the page on 127.0.0.1")] = False,
              port: Annotated[int, typer.Option(help="with --serve (0: any free port)")] = 8050) -> None:
    """One self-contained HTML page comparing a grid's variants (or the latest run): funnel, data, loss, scores."""
    from dashboards.build import publish, serve as serve_page
    from dashboards.queries import NothingToShowError
    from storage.workspace import Workspace, resolve_workspace

    try:
        path = publish(Workspace(resolve_workspace(workspace)), grid, out)
    except NothingToShowError as err:
        _fail(str(err), code=1)
    typer.echo(f"dashboard: {path}  (open it in a browser; it needs no network)")
    if serve_:
        serve_page(path, port)


@app.command()
def serve(files: Annotated[list[Path], typer.Argument(help="recipes (a `schedule:` makes them cron jobs) and grids")],
          workspace: WorkspaceOpt = None,
          pool: Annotated[str | None, typer.Option(
              "--pool", help="deploy to this Prefect work pool (made a process pool if missing) and return: "
                             "`prefect worker start --pool NAME` runs them, on any machine")] = None) -> None:
    """Serve Prefect deployments of recipes and grids: scheduled runs, and runs started from the Prefect UI."""
    from flows.recipe import RecipeError
    from storage.workspace import Workspace

    ws = Workspace.at(workspace)
    _attach_ui(ws.root)
    from flows.serve import PoolError, deploy_to_pool, deployments, serve_deployments

    try:
        made = deployments(files, ws.root, pool)
        if pool:
            typer.echo(deploy_to_pool(made, pool, ws.root))
            return
    except (RecipeError, PoolError) as err:
        _fail(str(err))
    names = ", ".join(f"{d.flow_name}/{d.name}" for d in made)
    typer.echo(f"serving {len(made)} deployments ({names}) for workspace {ws.root}; Ctrl-C stops serving, "
               "schedules stay active")
    serve_deployments(made)


@app.command()
def sbatch(recipe: Annotated[Path, typer.Argument(help="YAML recipe whose pretrain.nnodes > 1")],
           workspace: WorkspaceOpt = None,
           set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe value: a.b=value")] = None,
           partition: Annotated[Optional[str], typer.Option(help="#SBATCH --partition")] = None,
           time: Annotated[Optional[str], typer.Option(help="#SBATCH --time, e.g. 24:00:00")] = None,
           gpus_per_node: Annotated[Optional[int], typer.Option(min=0, help="default: pretrain.nproc_per_node "
                                    "(0 when pretrain.device is cpu)")] = None,
           cpus_per_task: Annotated[Optional[int], typer.Option(min=1, help="default: 8 per torchrun worker")] = None,
           port: Annotated[int, typer.Option(help="the c10d rendezvous port on the first node")] = 29500,
           out: Annotated[Optional[Path], typer.Option(help="write the script here (default: print it)")] = None,
           ) -> None:
    """Write a Slurm batch script that pretrains RECIPE on pretrain.nnodes nodes (submit it with `sbatch`)."""
    from flows.recipe import RecipeError
    from storage.workspace import resolve_workspace
    from tasks.pretrain.slurm import SlurmError, SlurmOptions, sbatch_script

    options = SlurmOptions(partition, time, gpus_per_node, cpus_per_task, port)
    try:
        script = sbatch_script(recipe, set_ or [], resolve_workspace(workspace), options)
    except (RecipeError, SlurmError) as err:
        _fail(str(err))
    if out is None:
        typer.echo(script, nl=False)
        return
    out.write_text(script)
    typer.echo(f"wrote {out}: submit it with `sbatch {out}` (the workspace must be on a filesystem every node mounts)")


@app.command()
def demo(workspace: WorkspaceOpt = None, verbose: VerboseOpt = False) -> None:
    """Run the offline demo recipe (configs/demo.yaml) on the bundled Wikipedia summaries."""
    from storage.workspace import resolve_workspace

    recipe = REPO_ROOT / "configs" / "demo.yaml"
    if not recipe.is_file():
        _fail(f"{recipe} not found: run the demo from a checkout of lmforge")
    ws = resolve_workspace(workspace)         # where the user is; the recipe's data paths are the checkout's
    os.chdir(REPO_ROOT)
    _run_pipeline(_load(recipe, None), ws, None, None, None, verbose)


@app.command()
def catalog(sql: Annotated[Optional[str], typer.Argument(help='SQL, e.g. "select * from stage_runs"')] = None,
            workspace: WorkspaceOpt = None,
            export_: Annotated[Optional[Path], typer.Option("--export", help="write every table as Parquet and a "
                              "views.sql recreating the views, for other tools (pandas, polars, Spark, duckdb)")] = None,
            ) -> None:
    """Query the workspace catalog (DuckDB) and print a table; or --export it as Parquet."""
    import duckdb

    from flows.stages import catalog_views
    from storage.catalog import Catalog
    from storage.workspace import resolve_workspace

    path = resolve_workspace(workspace) / "catalog.duckdb"
    if not path.is_file():
        _fail(f"no catalog at {path}: run a recipe first, or pass --workspace")
    if (sql is None) == (export_ is None):
        _fail("give a SQL query or --export DIR (one of them)")
    try:
        if export_ is not None:
            written = Catalog(path).export(export_, catalog_views())
            typer.echo("\n".join(["wrote:", *(f"  {p}" for p in written)]))
            return
        names, rows = Catalog(path).query(sql, catalog_views())
    except duckdb.Error as err:
        _fail(f"query failed: {str(err).splitlines()[0]}", code=1)
    except OSError as err:         # --export to a file, or where no folder can be made
        _fail(f"--export {export_}: {err.strerror}", code=1)
    typer.echo(format_table(names, rows))


def format_table(names: list[str], rows: list[tuple]) -> str:
    """A plain aligned text table."""
    cells = [[str(v) if v is not None else "" for v in row] for row in rows]
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


@app.command()
def ui(workspace: WorkspaceOpt = None,
       host: Annotated[str, typer.Option(help="address to bind; keep 127.0.0.1 unless you mean it")] = "127.0.0.1",
       prefect_port: int = 4200, mlflow_port: int = 5000,
       backend: Annotated[Optional[str], typer.Option(help="PostgreSQL for both servers' records: "
                          "postgresql://user@host:port/db (databases <db>_prefect, <db>_mlflow; password in "
                          "PGPASSWORD)", show_default=False)] = None,
       artifacts: Annotated[Optional[str], typer.Option(help="with --backend: where MLflow keeps artifacts, a "
                            "directory or s3://, gs://... (default: <workspace>/mlartifacts)",
                            show_default=False)] = None) -> None:
    """Start the Prefect and MLflow UIs on 127.0.0.1 and print their addresses (Ctrl-C stops both)."""
    from flows.ui import UIError, plan_ui, serve_uis
    from storage.postgres import BackendError
    from storage.workspace import Workspace

    try:
        serve_uis(plan_ui(Workspace.at(workspace), host, prefect_port, mlflow_port, backend, artifacts))
    except (BackendError, UIError) as err:
        _fail(str(err), code=1)


StageDirArg = Annotated[Path, typer.Argument(help="a pretrain output (workspace/stages/pretrain/<fp>), a finetune "
                        "task folder (stages/finetune/<fp>/<task>) or a model folder")]
TokenizerOpt = Annotated[Optional[Path], typer.Option(help="the tokenizer stage's output (default: found "
                         "through the workspace records)")]


@app.command()
def export(stage_dir: StageDirArg, out: Annotated[Path, typer.Argument(help="a new folder for the export")],
           format_: Annotated[str, typer.Option("--format", help="hf: a folder transformers loads")] = "hf",
           tokenizer: TokenizerOpt = None) -> None:
    """Export a trained model (--format hf: GPT2LMHeadModel / BertForPreTraining + tokenizer files)."""
    from storage.stage import StageError
    from tasks.export import export as export_model

    try:
        typer.echo(f"exported {export_model(stage_dir, out, format_, tokenizer)}")
    except StageError as err:
        _fail(str(err), code=1)


@app.command()
def generate(stage_dir: StageDirArg,
             prompt: Annotated[Optional[list[str]], typer.Option(help="text to continue (repeatable)")] = None,
             prompts_file: Annotated[Optional[Path], typer.Option(help="one prompt per line")] = None,
             max_new_tokens: int = 100, temperature: Annotated[float, typer.Option(help="0: greedy")] = 0.8,
             top_k: Annotated[int, typer.Option(help="sample among the k likeliest tokens (0: all)")] = 40,
             seed: int = 0, format_: Annotated[str, typer.Option("--format", help="text (streamed) or jsonl")] = "text",
             tokenizer: TokenizerOpt = None, device: str = "auto") -> None:
    """Continue prompts with a trained GPT, streaming tokens as they are sampled (KV cache)."""
    from storage.stage import StageError
    from tasks.export import Sampling, generate as run_generate

    try:
        run_generate(stage_dir, prompt or [], Sampling(max_new_tokens, temperature, top_k or None, seed), sys.stdout,
                     format_, tokenizer, device, prompts_file)
    except StageError as err:
        _fail(str(err), code=1)


def main() -> None:
    from storage.catalog import CatalogLockError

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    try:
        app()
    except CatalogLockError as err:   # any command that reads or writes the catalog: one line, not a traceback
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
