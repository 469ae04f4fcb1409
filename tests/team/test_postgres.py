"""Running as a team, step 1: one PostgreSQL behind the Prefect server and the MLflow server.

A real PostgreSQL cluster (pgfixture), a real `lmforge ui --backend postgresql://...` (prefect server
start + mlflow server, as subprocesses), real `lmforge run`s against them. The commands are the
README's ("Running as a team", step 1), in its order: the role, PGPASSWORD, the ui, a run in the
same workspace, a run configured by environment variables only (another machine).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pgfixture
import psutil
import pytest
from cliutil import REPO_ROOT, free_port

from flows.ui import plan_ui
from storage.postgres import BackendError, parse_backend
from storage.tracking import tracking_uri
from storage.workspace import Workspace

PASSWORD = "change-me"                        # the README's; searched for in everything lmforge prints or stores
CREATE_ROLE = f"CREATE ROLE lmforge LOGIN CREATEDB PASSWORD '{PASSWORD}'"
MLFLOW_TABLES_DB, PREFECT_TABLES_DB = "lmforge_mlflow", "lmforge_prefect"


@dataclass(frozen=True)
class TeamUI:
    """A running `lmforge ui --backend ...`: its addresses, workspace, artifact store and output log."""

    pg: pgfixture.PgCluster
    proc: subprocess.Popen
    workspace: Path
    artifacts: Path
    log: Path
    prefect_api: str
    mlflow_url: str


def clean_env(**extra: str) -> dict[str, str]:
    """The test session's environment without the settings that would point runs elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PGPASSWORD")}
    return {**env, **extra}


def lmforge(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def start_lmforge(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def pg() -> Iterator[pgfixture.PgCluster]:
    try:
        with pgfixture.postgres_cluster() as cluster:
            cluster.psql("-c", CREATE_ROLE)           # README: sudo -u postgres psql -c "CREATE ROLE ..."
            cluster.psql("-c", "CREATE ROLE reader LOGIN PASSWORD 'reader-pw'")      # no CREATEDB
            yield cluster
    except pgfixture.PostgresUnavailable as err:
        pytest.skip(f"PostgreSQL cannot be installed here: {err}")


@pytest.fixture(scope="module")
def team_ui(pg: pgfixture.PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamUI]:
    """`PGPASSWORD=... lmforge ui -w ws --backend postgresql://lmforge@127.0.0.1:PORT/lmforge --artifacts DIR`."""
    root = tmp_path_factory.mktemp("team-ui")
    ws, artifacts, log = root / "ws", root / "mlartifacts", root / "ui.log"
    prefect_port, mlflow_port = free_port(), free_port()
    env = clean_env(PGPASSWORD=PASSWORD, PREFECT_HOME=str(root / "prefect-home"))
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "-w", str(ws),
                                 "--backend", pg.url("lmforge", "lmforge"), "--artifacts", str(artifacts),
                                 "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
                                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 300
        while not (ws / "ui.json").is_file():        # written once both servers answer
            assert proc.poll() is None, f"lmforge ui exited {proc.returncode}: {log.read_text()[-3000:]}"
            assert time.time() < deadline, f"lmforge ui not ready in 300 s: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield TeamUI(pg, proc, ws, artifacts, log, f"http://127.0.0.1:{prefect_port}/api",
                     f"http://127.0.0.1:{mlflow_port}")
    finally:
        stop_ui(proc)


def stop_ui(proc: subprocess.Popen) -> None:
    """Ctrl-C (the ui stops both servers), then kill the whole tree if anything is left."""
    family = [proc, *psutil.Process(proc.pid).children(recursive=True)] if proc.poll() is None else []
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass


def pipeline_row(ws: Path) -> tuple[str, str, str]:
    """(lmforge run id, MLflow parent run id, Prefect flow run id) of the workspace's only pipeline run."""
    import duckdb

    with duckdb.connect(str(ws / "catalog.duckdb"), read_only=True) as con:
        rows = con.execute("select run_id, mlflow_run_id, prefect_flow_run_id from pipeline_runs").fetchall()
    assert len(rows) == 1, rows
    return rows[0]


def prefect_flow_run(api: str, flow_run_id: str) -> dict:
    with urllib.request.urlopen(f"{api}/flow_runs/{flow_run_id}", timeout=10) as response:
        return json.loads(response.read())


def nested_runs(mlflow_url: str, parent_run_id: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_url)
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


@pytest.fixture(scope="module")
def first_run(team_ui: TeamUI, shared_data: Path) -> tuple[str, str, str]:
    """README: `lmforge run configs/nightly.yaml -w workspace --until curate` in the ui's workspace, nothing
    else set: it finds the ui. Ingest and curate of ../shared/data's small raw files: two nested runs."""
    out = lmforge(["run", "configs/nightly.yaml", "-w", str(team_ui.workspace), "--until", "curate"], clean_env())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"Prefect: {team_ui.prefect_api}" in out.stdout
    assert PASSWORD not in out.stdout + out.stderr
    assert "View run" not in out.stdout                      # MLflow's per-run links would break the stage lines
    return pipeline_row(team_ui.workspace)


def test_run_records_flow_run_mlflow_runs_and_artifacts_in_postgres(team_ui: TeamUI, first_run, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    _, parent_id, flow_run_id = first_run
    assert prefect_flow_run(team_ui.prefect_api, flow_run_id)["state_type"] == "COMPLETED"
    client = MlflowClient(team_ui.mlflow_url)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "nightly"
    children = nested_runs(team_ui.mlflow_url, parent_id)
    assert sorted(c.data.tags["lmforge.stage"] for c in children) == ["curate", "ingest"]
    assert {c.info.status for c in children} == {"FINISHED"}

    # artifacts go through the server (mlflow-artifacts:), as from a machine without the shared folder
    assert client.get_experiment(parent.info.experiment_id).artifact_location.startswith("mlflow-artifacts:")
    report = tmp_path / "report.txt"
    report.write_text("uploaded through the MLflow server\n")
    client.log_artifact(parent_id, str(report))
    fetched = Path(client.download_artifacts(parent_id, "report.txt", str(tmp_path / "down")))
    assert fetched.read_text() == report.read_text()
    assert [p.read_text() for p in team_ui.artifacts.rglob("report.txt")] == [report.read_text()]

    # the records are PostgreSQL rows, and no sqlite store appeared in the workspace
    assert team_ui.pg.query(f"select state_type from flow_run where id = '{flow_run_id}'",
                            PREFECT_TABLES_DB) == [("COMPLETED",)]
    rows = team_ui.pg.query("select run_uuid, status from runs", MLFLOW_TABLES_DB)
    assert {parent_id, *(c.info.run_id for c in children)} <= {r[0] for r in rows}
    assert not list(team_ui.workspace.glob("*.db"))


def test_two_runs_at_once_each_keep_their_own_records(team_ui: TeamUI, tmp_path: Path):
    """Two processes at once, on a fresh experiment both create: one attached through ui.json, one
    configured only by PREFECT_API_URL and MLFLOW_TRACKING_URI (another machine, its own workspace)."""
    other_ws = tmp_path / "elsewhere"
    args = ["run", "configs/nightly.yaml", "--until", "curate", "--set", "experiment=race"]
    attached = start_lmforge([*args, "-w", str(team_ui.workspace), "--force", "ingest,curate"], clean_env())
    remote = start_lmforge([*args, "-w", str(other_ws)],
                           clean_env(PREFECT_API_URL=team_ui.prefect_api, MLFLOW_TRACKING_URI=team_ui.mlflow_url))
    outputs = [proc.communicate(timeout=600) for proc in (attached, remote)]
    for proc, (stdout, stderr) in zip((attached, remote), outputs):
        assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]

    import duckdb

    with duckdb.connect(str(team_ui.workspace / "catalog.duckdb"), read_only=True) as con:
        row_a = con.execute("select run_id, mlflow_run_id, prefect_flow_run_id from pipeline_runs "
                            "order by started_at desc limit 1").fetchone()
    row_b = pipeline_row(other_ws)
    assert row_a[2] != row_b[2] and row_a[1] != row_b[1]
    for run_id, parent_id, flow_run_id in (row_a, row_b):
        assert prefect_flow_run(team_ui.prefect_api, flow_run_id)["state_type"] == "COMPLETED"
        children = nested_runs(team_ui.mlflow_url, parent_id)
        assert sorted(c.data.tags["lmforge.stage"] for c in children) == ["curate", "ingest"]
        assert {c.info.status for c in children} == {"FINISHED"}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(team_ui.mlflow_url)
    race = client.get_experiment_by_name("race")
    runs = client.search_runs([race.experiment_id])
    assert len(runs) == 6                                          # 2 parents + 2 x 2 stages: nothing lost, nothing extra
    parents = {r.info.run_id: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {row_a[1], row_b[1]}
    for run in runs:                                               # every stage run sits under its own process's parent
        if run.info.run_id not in parents:
            parent = parents[run.data.tags["mlflow.parentRunId"]]
            assert run.data.tags["lmforge.pid"] == parent.data.tags["lmforge.pid"]


def test_password_is_never_shown_or_stored(team_ui: TeamUI, first_run) -> None:
    from mlflow.tracking import MlflowClient

    output = team_ui.log.read_text()
    assert "Prefect UI:" in output and "lmforge_mlflow" in output and PASSWORD not in output
    record = (team_ui.workspace / "ui.json").read_text()
    assert json.loads(record)["mlflow_tracking_uri"] == team_ui.mlflow_url and PASSWORD not in record
    servers = psutil.Process(team_ui.proc.pid).children(recursive=True)
    assert len(servers) >= 2 and not [p.cmdline() for p in servers if PASSWORD in " ".join(p.cmdline())]
    client = MlflowClient(team_ui.mlflow_url)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert first_run[1] in {r.info.run_id for r in runs}
    for run in runs:
        assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if PASSWORD in v], run.info.run_name


@pytest.mark.parametrize("url, says", [
    ("sqlite:///x.db", "--backend sqlite:///x.db: not a PostgreSQL URL"),
    ("postgresql://lmforge@127.0.0.1:{dead}/lmforge", "cannot use PostgreSQL at 127.0.0.1:{dead} as 'lmforge'"),
    ("postgresql://lmforge:wrong-pw@127.0.0.1:{pg}/lmforge", "password authentication failed"),
    ("postgresql://reader:reader-pw@127.0.0.1:{pg}/team", "role 'reader' may not create databases; ask an admin "
     "to run `createdb -O reader <name>` for team_prefect and team_mlflow"),
], ids=["not-postgresql", "nothing-listens", "wrong-password", "no-createdb"])
def test_bad_backend_fails_at_once_saying_why(pg: pgfixture.PgCluster, tmp_path: Path, url: str, says: str) -> None:
    ports = {"dead": free_port(), "pg": pg.port}
    started = time.time()
    out = lmforge(["ui", "-w", str(tmp_path / "ws"), "--backend", url.format(**ports), "--prefect-port",
                   str(free_port()), "--mlflow-port", str(free_port())], clean_env(), timeout=120)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and says.format(**ports) in errors[0], out.stderr
    assert "-pw" not in out.stdout + out.stderr                   # the URL's password, if any, is never echoed
    assert time.time() - started < 30                             # no server was started, nothing waited on
    assert not (tmp_path / "ws" / "ui.json").exists()


def test_run_refuses_a_workspace_whose_team_ui_is_gone(tmp_path: Path) -> None:
    """ui.json of a killed `lmforge ui --backend`: the run says so instead of logging somewhere else."""
    ws = tmp_path / "ws"
    ws.mkdir()
    gone = f"http://127.0.0.1:{free_port()}"
    (ws / "ui.json").write_text(json.dumps({"prefect_api_url": f"{gone}/api", "mlflow_url": gone,
                                            "mlflow_tracking_uri": gone, "pid": 1}))
    out = lmforge(["run", "configs/nightly.yaml", "-w", str(ws), "--until", "curate"], clean_env(), timeout=120)
    assert out.returncode == 1 and f"the MLflow server at {gone}, which does not answer" in out.stderr, out.stderr
    assert not (ws / "mlflow.db").exists()


def test_backend_url_parsing_keeps_the_password_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", "from-env")
    backend = parse_backend("postgresql://lmforge@db.example:6543/team")
    assert (backend.address, backend.user, backend.password) == ("db.example:6543", "lmforge", "from-env")
    assert backend.url("postgresql+psycopg", backend.database_for("mlflow")) == \
        "postgresql+psycopg://lmforge@db.example:6543/team_mlflow"
    assert "from-env" not in repr(backend) and backend.env() == {"PGPASSWORD": "from-env"}
    assert parse_backend("postgresql://u:in%40url@h/d").password == "in@url"      # the URL's wins, decoded
    for bad in ("postgresql://h:5432/d", "postgresql://u@h:5432/", "mysql://u@h/d", "postgresql://u@h:notaport/d"):
        with pytest.raises(BackendError, match="--backend"):
            parse_backend(bad)


def test_runs_log_where_the_ui_says_unless_mlflow_tracking_uri_is_set(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "ui.json").write_text(json.dumps({"prefect_api_url": "http://127.0.0.1:1/api",
                                                  "mlflow_url": "http://127.0.0.1:1"}))
    assert tracking_uri(tmp_path).startswith("sqlite:")          # a sqlite-backed ui: runs write its file
    (tmp_path / "ui.json").write_text(json.dumps({"mlflow_tracking_uri": "http://127.0.0.1:1"}))
    assert tracking_uri(tmp_path) == "http://127.0.0.1:1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mine:5000")
    assert tracking_uri(tmp_path) == "http://mine:5000"
    with pytest.raises(BackendError, match="--artifacts needs --backend"):
        plan_ui(Workspace(tmp_path), "127.0.0.1", 4200, 5000, None, str(tmp_path / "artifacts"))
