"""Running as a team, step 2: curate and dedup on a real local Ray cluster (datatrove's Ray executor).

The module's cluster is the README's `ray start --head ...` (same flags; a free port and a temp
dir of its own), torn down by killing exactly the processes of its session: `ray stop` would stop
every Ray on the machine. The CLI runs are the README's `lmforge run ... --set ...executor.kind=ray`.
The failure tests run small pipelines of test steps (pickled by value to the Ray workers).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import psutil
import pytest
from cliutil import REPO_ROOT, free_port
from datatrove.pipeline.base import PipelineStep
from pydantic import ValidationError

from flows.stages import catalog_views
from storage.catalog import Catalog
from storage.stage import StageError
from tasks.curate import CurateConfig
from tasks.docpipe.config import ExecutorConfig
from tasks.docpipe.executors import RAY_LOOPBACK_ENV, build_executor, run_executor

if find_spec("ray") is None:  # (not importorskip: this process must import ray only once its environment is set)
    pytest.skip("ray is not installed: pip install -e '.[team]'", allow_module_level=True)

# This module's Ray token: `ray start` finds it and turns token authentication on, lmforge finds it and sends
# it; the user's ~/.ray/auth_token is neither read nor created.
RAY_TOKEN = {"RAY_AUTH_TOKEN": uuid.uuid4().hex}


@pytest.fixture(scope="module", autouse=True)
def ray_environment() -> Iterator[None]:
    """What Ray reads on import, set before this process imports it (the CLI's processes set it themselves)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**RAY_TOKEN, RAY_LOOPBACK_ENV: "0", "RAY_AUTH_MODE": "token"}.items():
            patch.setenv(name, value)
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the Ray workers cannot import this file
        yield


def user_env() -> dict[str, str]:
    """The environment of a user's shell: none of the Ray settings above but the token."""
    env = {k: v for k, v in os.environ.items() if k not in (RAY_LOOPBACK_ENV, "RAY_AUTH_MODE")}
    return {**env, **RAY_TOKEN}


LMFORGE = [sys.executable, "-m", "flows.cli"]


def lmforge(args: list[str]) -> subprocess.CompletedProcess:
    """`lmforge ARGS` as a user runs it (cliutil.run_cli, with the user's environment)."""
    out = subprocess.run([*LMFORGE, *args], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         env=user_env())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


RAY = str(Path(sys.executable).parent / "ray")
# the README's `ray start`, flag for flag (the port is a free one here)
RAY_START = ["start", "--head", "--node-ip-address=127.0.0.1", "--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats"]
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
STAGES = ("curate", "dedup")


@dataclass(frozen=True)
class RayHead:
    address: str
    session: int   # the session id of `ray start`: every process of this cluster, workers included, has it

    def processes(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.session:
                    found.append(proc)
            except (ProcessLookupError, PermissionError):
                continue
        return found

    def rank_workers(self) -> list[psutil.Process]:
        return [p for p in self.processes() if _name(p).startswith("ray::RankWorker")]


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def kill(procs: list[psutil.Process]) -> None:
    """SIGKILL, as `ray stop --force` does (a test cluster has nothing to save), and wait for them to go."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """`ray start --head` on 127.0.0.1 in a session of its own; all of that session's processes are ended after."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="lmf-ray-", dir="/tmp")  # short: Ray's unix sockets live below it
    command = [RAY, *(arg.format(port=port) for arg in RAY_START), f"--temp-dir={temp_dir}"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**user_env(), RAY_LOOPBACK_ENV: "0"})
    head = RayHead(f"127.0.0.1:{port}", proc.pid)
    try:
        output, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"`ray start` failed ({proc.returncode}):\n{output[-3000:]}")
        yield head
    finally:
        proc.kill()
        kill(head.processes())
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def test_the_cluster_listens_on_loopback_only(ray_head):
    listening = {(p.pid, _name(p), c.laddr.ip) for p in ray_head.processes()
                 for c in _connections(p) if c.status == psutil.CONN_LISTEN}
    assert any(name == "gcs_server" for _, name, _ in listening), listening
    assert all(ip in LOOPBACK for _, _, ip in listening), sorted(listening)


def _is_ray(proc: psutil.Process) -> bool:
    """A process of Ray's (its servers, agents, workers), not another child of the test process."""
    try:
        command = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return "/site-packages/ray/" in command or command.startswith("ray::") or "-m ray." in command


def _connections(proc: psutil.Process) -> list:
    try:
        return proc.net_connections(kind="inet")
    except psutil.Error:
        return []


# --- curate and dedup through the CLI: local and Ray give the same stages -------------------------

@pytest.fixture(scope="module")
def recipe(tmp_path_factory, shared_data) -> Path:
    """Both real WARC files and Wikipedia summaries, 30 of them a second time as `mirror` (dedup's work)."""
    path = tmp_path_factory.mktemp("recipe") / "ray.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "name": "ray", "seed": 7,
        "ingest": {"sources": [{"name": "cc", "kind": "warc", "paths": [str(shared_data / "raw/*.warc.gz")]},
                               {"name": "wiki", "kind": "wiki_offline", "languages": ["en"], "max_docs": 60},
                               {"name": "mirror", "kind": "wiki_offline", "languages": ["en"], "max_docs": 30}]},
        "curate": {"executor": {"tasks": 2, "workers": 2}},
        "dedup": {"minhash": {"num_buckets": 2}, "executor": {"tasks": 2, "workers": 2}}}))
    return path


@pytest.fixture(scope="module")
def local_workspace(recipe, prefect_api, tmp_path_factory) -> Path:
    """The reference: the same recipe on datatrove's local executor."""
    ws = tmp_path_factory.mktemp("local") / "ws"
    lmforge(["run", str(recipe), "--workspace", str(ws), "--until", "dedup"])
    return ws


def ray_sets(address: str) -> list[str]:
    """The README's overrides: both stages on the Ray cluster at `address`."""
    return ["--set", "curate.executor.kind=ray", "--set", f"curate.executor.ray.address={address}",
            "--set", "dedup.executor.kind=ray", "--set", f"dedup.executor.ray.address={address}"]


def finished_stages(ws: Path) -> dict[str, str]:
    """stage -> fingerprint of the built curate and dedup stages."""
    rows = Catalog(ws / "catalog.duckdb").query(
        "select stage, fingerprint from stage_runs where status = 'finished' and not cached", catalog_views())[1]
    return {stage: fingerprint for stage, fingerprint in rows if stage in STAGES}


def stage_stats(ws: Path, stage: str, fingerprint: str) -> dict[str, float]:
    """The catalog's counters of one stage, wall times left out."""
    rows = Catalog(ws / "catalog.duckdb").query(
        "select name, value from stage_stats where stage = ? and fingerprint = ?", catalog_views(),
        [stage, fingerprint])[1]
    return {name: value for name, value in rows if not name.startswith("time_s/")}


def parquet_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*.parquet"))}


def completions(ws: Path, stage: str) -> Path:
    found = list((ws / "scratch" / stage).glob("*/logs/pipeline/completions"))
    return found[0] if found else ws / "scratch" / stage / "none"


def test_a_killed_ray_run_resumes_its_missing_ranks_and_equals_the_local_run(ray_head, recipe, local_workspace,
                                                                             tmp_path):
    """SIGKILL of the `lmforge run` driving curate on Ray, after its first rank completed; the rerun
    runs only the other rank, then dedup, and both stages equal the local executor's, byte for byte."""
    ws = tmp_path / "ws"
    run = ["run", str(recipe), "--until", "dedup", *ray_sets(ray_head.address), "--workspace", str(ws)]
    # one rank at a time, so the kill lands between the first and the last rank
    killed_log = tmp_path / "killed-run.log"
    with open(killed_log, "w") as log:
        proc = subprocess.Popen([*LMFORGE, *run, "--set", "curate.executor.workers=1"], cwd=REPO_ROOT,
                                start_new_session=True, stdout=log, stderr=subprocess.STDOUT, env=user_env())
    try:
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline and not any(completions(ws, "curate").glob("*")):
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = sorted(p.name for p in completions(ws, "curate").glob("*"))
    assert done == ["00000"], f"the driver must die after rank 0, before rank 1: {done}\n{killed_log.read_text()[-3000:]}"
    deadline = time.time() + 60   # Ray ends a dead driver's workers itself: none may go on writing
    while ray_head.rank_workers() and time.time() < deadline:
        time.sleep(0.2)
    assert not ray_head.rank_workers(), "the killed driver's Ray workers are still running"

    lmforge(run)   # the README's command
    log_dir = max((ws / "logs").iterdir(), key=lambda p: p.stat().st_mtime)   # the rerun's
    curate_log, dedup_log = (log_dir / "curate.log").read_text(), (log_dir / "dedup.log").read_text()
    assert "Will run pipeline on 1 incomplete ranks out of 2 total" in curate_log  # on Ray, rank 1 only
    assert "Connected to Ray cluster" in dedup_log and "datatrove.executor.ray" in dedup_log

    local, on_ray = finished_stages(local_workspace), finished_stages(ws)
    assert on_ray == local and set(local) == set(STAGES)   # executor.kind is not part of the fingerprint
    for stage, fingerprint in local.items():
        reference = parquet_bytes(local_workspace / "stages" / stage / fingerprint)
        assert reference and parquet_bytes(ws / "stages" / stage / fingerprint) == reference, stage
        assert stage_stats(ws, stage, fingerprint) == stage_stats(local_workspace, stage, fingerprint), stage
    assert stage_stats(ws, "dedup", local["dedup"])["minhash/clusters"] > 0


# --- failures on Ray: a failing rank, a killed worker, no cluster ---------------------------------

class FailWhileFlagged(PipelineStep):
    """While the file `flag` exists (the bug the rerun finds fixed): raises on rank `fails`, hangs on rank `hangs`."""

    name = "💥 fails while flagged"

    def __init__(self, flag: str, fails: int, hangs: int = -1) -> None:
        super().__init__()
        self.flag, self.fails, self.hangs = flag, fails, hangs

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if rank == self.fails and Path(self.flag).exists():
            raise RuntimeError(f"rank {rank} is broken")
        while rank == self.hangs and Path(self.flag).exists():
            time.sleep(0.1)
        yield from data or ()


class GateOnRank(PipelineStep):
    """On `rank`: writes `pid-<pid>` (holding its parent's pid) into `folder`, then waits for `folder/open`."""

    name = "🚧 gate"

    def __init__(self, folder: str, rank: int) -> None:
        super().__init__()
        self.folder, self.rank = folder, rank

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if rank == self.rank:
            tmp = Path(self.folder) / f"tmp-{os.getpid()}"
            tmp.write_text(str(os.getppid()))
            tmp.rename(Path(self.folder) / f"pid-{os.getpid()}")
            while not (Path(self.folder) / "open").exists():
                time.sleep(0.05)
        yield from data or ()


class RecordRayProcesses(PipelineStep):
    """Writes, per rank, its Ray worker's raylet and, for a Ray its driver started (`family`), the Ray
    processes of that driver and the addresses they listen on."""

    name = "🔎 record ray"

    def __init__(self, folder: str, family: bool = False) -> None:
        super().__init__()
        self.folder, self.family = folder, family

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        raylet = psutil.Process(os.getppid()).parent()
        record = {"raylet": raylet.pid, "driver": raylet.ppid()}
        if self.family:
            family = [p for p in raylet.parent().children(recursive=True) if _is_ray(p) and p.pid != os.getpid()]
            record.update(pids=[p.pid for p in family],
                          listening=sorted({c.laddr.ip for p in family for c in _connections(p)
                                            if c.status == psutil.CONN_LISTEN}))
        (Path(self.folder) / f"{rank}.json").write_text(json.dumps(record))
        yield from data or ()


def dead(pid: int) -> bool:
    """Gone, or a zombie its new parent has not reaped yet (it runs no code and holds no file)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def ray_config(address: str | None, tasks: int) -> ExecutorConfig:
    # time_s: a hung rank fails the test instead of hanging it
    return ExecutorConfig(kind="ray", tasks=tasks, workers=2, ray={"address": address, "time_s": 60})


def test_failing_and_timed_out_ranks_are_named_and_the_rerun_runs_only_them(ray_head, tmp_path):
    """Rank 1 raises, rank 2 hangs past executor.ray.time_s: the other ranks complete, the error names
    both ranks and why; once fixed, the rerun runs ranks 1 and 2 only."""
    flag = tmp_path / "broken"
    flag.touch()
    logs = tmp_path / "logs"
    config = ExecutorConfig(kind="ray", tasks=4, workers=2, ray={"address": ray_head.address, "time_s": 3})
    with pytest.raises(StageError, match=r"(?s)test: 2 of 4 tasks failed.*rank 1: RuntimeError: rank 1 is broken"
                                         r".*rank 2: did not complete.*ran past executor.ray.time_s"):
        run_executor(build_executor([FailWhileFlagged(str(flag), 1, 2)], config, logs), config, "test")
    assert sorted(p.name for p in (logs / "completions").iterdir()) == ["00000", "00003"]
    assert "rank 1 is broken" in json.loads((logs / "failed" / "00001.json").read_text())["traceback"]
    stamps = {rank: (logs / "stats" / f"{rank}.json").stat().st_mtime_ns for rank in ("00000", "00003")}

    flag.unlink()
    run_executor(build_executor([FailWhileFlagged(str(flag), 1, 2)], config, logs), config, "test")
    assert sorted(p.name for p in (logs / "completions").iterdir()) == ["00000", "00001", "00002", "00003"]
    assert {rank: (logs / "stats" / f"{rank}.json").stat().st_mtime_ns for rank in stamps} == stamps
    assert not (logs / "failed" / "00001.json").exists()


def test_a_killed_ray_worker_is_retried_within_the_run(ray_head, tmp_path):
    """SIGKILL of the Ray worker (actor) running rank 1: its rank process dies with it, Ray reports the
    worker lost, and datatrove resubmits the rank in a new worker: the pass still completes."""
    gate, logs = tmp_path / "gate", tmp_path / "logs"
    gate.mkdir()
    killed: dict[str, int] = {}

    def kill_first_then_open() -> None:
        deadline = time.time() + 120
        while not list(gate.glob("pid-*")) and time.time() < deadline:
            time.sleep(0.05)
        first = next(gate.glob("pid-*"))
        killed.update(rank_process=int(first.name[4:]), worker=int(first.read_text()))
        killed["worker_name"] = _name(psutil.Process(killed["worker"]))
        first.unlink()
        os.kill(killed["worker"], signal.SIGKILL)
        while not list(gate.glob("pid-*")) and time.time() < deadline:  # the retry reaches the gate
            time.sleep(0.05)
        (gate / "open").touch()

    killer = threading.Thread(target=kill_first_then_open, daemon=True)
    killer.start()
    config = ray_config(ray_head.address, tasks=2)
    run_executor(build_executor([GateOnRank(str(gate), 1)], config, logs), config, "test")
    killer.join(timeout=10)
    assert killed["worker_name"].startswith("ray::RankWorker")
    assert dead(killed["rank_process"]), "the rank's process outlived its killed worker"
    (retry,) = gate.glob("pid-*")
    assert int(retry.name[4:]) != killed["rank_process"]
    assert sorted(p.name for p in (logs / "completions").iterdir()) == ["00000", "00001"]


def test_an_unreachable_address_is_a_clear_error_in_seconds(tmp_path):
    address = f"127.0.0.1:{free_port()}"   # nothing listens there
    config = ray_config(address, tasks=2)
    started = time.time()
    with pytest.raises(StageError, match=f"curate: no Ray cluster answers at executor.ray.address={address}"):
        run_executor(build_executor([FailWhileFlagged("/nonexistent", 0)], config, tmp_path), config, "curate")
    assert time.time() - started < 10
    with pytest.raises(ValidationError, match="executor.ray.address\n.*must be the Ray head's host:port"):
        CurateConfig(executor={"kind": "ray", "ray": {"address": "127.0.0.1"}})


def test_without_an_address_a_private_ray_runs_the_pass_and_stops_with_it(tmp_path, monkeypatch):
    """No executor.ray.address and no $RAY_ADDRESS: a Ray started by this process for the pass, on
    127.0.0.1, none of whose processes is left once the pass returns."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    records = tmp_path / "records"
    records.mkdir()
    config = ray_config(None, tasks=2)
    handler = signal.getsignal(signal.SIGTERM)
    run_executor(build_executor([RecordRayProcesses(str(records), family=True)], config, tmp_path / "logs"), config,
                 "test")
    assert signal.getsignal(signal.SIGTERM) is handler, "ray.init's SIGTERM handler outlived the pass"
    seen = [json.loads((records / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert {r["driver"] for r in seen} == {os.getpid()}       # the Ray this test process started
    assert all(ip in LOOPBACK for r in seen for ip in r["listening"]) and seen[0]["listening"]
    import ray

    assert not ray.is_initialized()
    assert not [pid for r in seen for pid in r["pids"] if not dead(pid)], "a Ray process outlived the pass"


def test_ray_address_from_the_environment(ray_head, tmp_path, monkeypatch):
    """No executor.ray.address: $RAY_ADDRESS names the cluster (the module's, not a private one)."""
    monkeypatch.setenv("RAY_ADDRESS", ray_head.address)
    records = tmp_path / "records"
    records.mkdir()
    config = ray_config(None, tasks=1)
    run_executor(build_executor([RecordRayProcesses(str(records))], config, tmp_path / "logs"), config, "test")
    record = json.loads((records / "0.json").read_text())
    assert psutil.Process(record["raylet"]) in ray_head.processes()
    monkeypatch.setenv("RAY_ADDRESS", "head-without-port")
    with pytest.raises(StageError, match="RAY_ADDRESS must be the Ray head's host:port.*head-without-port"):
        run_executor(build_executor([RecordRayProcesses(str(records))], config, tmp_path / "logs2"), config, "test")
