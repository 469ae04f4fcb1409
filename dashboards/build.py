"""Build the dashboard page, file it beside the runs it shows (MLflow, Prefect), serve it on 127.0.0.1."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dashboards.queries import Selection, select
from storage.workspace import Workspace

ARTIFACT_DIR = "dashboard"        # under each variant's MLflow parent run


def default_path(ws: Workspace, grid: str | None) -> Path:
    """`ablations/<grid>/dashboard.html` for a grid, `dashboards/latest.html` for the latest run."""
    return ws.root / "ablations" / grid / "dashboard.html" if grid else ws.root / "dashboards" / "latest.html"


def build_dashboard(ws: Workspace, grid: str | None, out: Path | None = None) -> tuple[Path, Selection]:
    """Writes the page (atomically: a reader never sees half a file) and returns its path and the runs it shows."""
    from dashboards.page import build_page
    from flows.ui import mlflow_ui_url

    selection = select(ws, grid)
    page = build_page(selection, mlflow_ui_url(ws.root))
    path = Path(out) if out else default_path(ws, grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as tmp:
        tmp.write(page)
    os.chmod(tmp.name, 0o644)          # a temporary file is private; the page is for reading
    os.replace(tmp.name, path)
    return path, selection


def log_to_mlflow(selection: Selection, path: Path) -> list[str]:
    """The page as an artifact (`dashboard/<file>`) of every shown pipeline run's MLflow parent run."""
    from mlflow.tracking import MlflowClient

    from storage.tracking import tracking_uri

    client = MlflowClient(tracking_uri(selection.workspace.root))
    shown = [run_id for run in selection.runs
             for run_id in (run.mlflow_run_id, *(ref.pipeline_mlflow_run_id for ref in run.stages.values()))]
    run_ids = list(dict.fromkeys(run_id for run_id in shown if run_id))
    for run_id in run_ids:
        client.log_artifact(run_id, str(path), artifact_path=ARTIFACT_DIR)
    return run_ids


def publish_to_prefect(selection: Selection, path: Path, run_ids: list[str]) -> bool:
    """Inside a Prefect flow run: a markdown artifact linking the page and the MLflow runs that hold it."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    from flows.ui import mlflow_ui_url

    if FlowRunContext.get() is None:
        return False
    base = mlflow_ui_url(selection.workspace.root)
    lines = [f"# Dashboard: {selection.title}", "", f"- the page: [{path}]({path.resolve().as_uri()})"]
    lines += [f"- in MLflow, run [{run_id}]({base}/#/runs/{run_id}) under `{ARTIFACT_DIR}/{path.name}`"
              for run_id in run_ids]
    key = "dashboard-" + (selection.grid or "latest").lower().replace("_", "-").replace(".", "-")
    create_markdown_artifact("\n".join(lines), key=key, description=f"dashboard: {selection.title}")
    return True


def publish(ws: Workspace, grid: str | None, out: Path | None = None) -> Path:
    """Builds the page, logs it to the runs' MLflow parent runs and, inside a flow run, links it from Prefect."""
    path, selection = build_dashboard(ws, grid, out)
    run_ids = log_to_mlflow(selection, path)
    publish_to_prefect(selection, path, run_ids)
    return path


def serve(path: Path, port: int) -> None:
    """Serves the page, and nothing else (the page needs no other file), on 127.0.0.1 until Ctrl-C."""
    import http.server

    with http.server.ThreadingHTTPServer(("127.0.0.1", port), _page_handler(path)) as server:
        print(f"serving http://127.0.0.1:{server.server_address[1]}/{path.name} (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


def _page_handler(path: Path) -> type:
    """A handler that answers `/` and `/<page name>` with the page and 404 to every other path: the page's folder
    may be the checkout or the workspace (`--out report.html`), whose files are not for the browser."""
    import http.server

    class PageOnly(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:           # the name http.server calls
            if self.path.split("?", 1)[0] not in ("/", f"/{path.name}"):
                self.send_error(404, "only the dashboard page is served")
                return
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return PageOnly
