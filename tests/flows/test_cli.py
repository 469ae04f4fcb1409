"""The CLI and the Prefect pipeline, run as a user runs them: real processes, a real workspace."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cliutil import REPO_ROOT, catalog_rows, run_cli, write_recipe
from mlflow.tracking import MlflowClient



@pytest.fixture
def small_recipe(tmp_path, shared_data) -> Path:
    return write_recipe(tmp_path / "small.yaml", {"name": "small", "ingest": {"sources": [
        {"name": "dolma", "kind": "jsonl", "paths": [str(shared_data / "raw/dolma_ccnet_cc_en_head-0091.jsonl")]},
        {"name": "cc", "kind": "warc", "paths": [str(shared_data / "raw/*.warc.gz")]}]}})


def test_help_for_every_command():
    out = run_cli(["--help"])
    assert out.returncode == 0 and all(c in out.stdout for c in ("run", "plan", "demo", "catalog", "ui"))
    for command in ("run", "plan", "demo", "catalog", "ui"):
        out = run_cli([command, "--help"])
        assert out.returncode == 0 and "--workspace" in out.stdout, out.stderr


@pytest.mark.parametrize("extra, message", [
    ({"ingest": {"sources": [{"name": "a", "kind": "text", "paths": ["x"], "colour": 1}]}},
     "ingest.sources.0.text.colour: unknown key"),
    ({"ingest": {"sources": [{"name": "a", "kind": "text", "paths": ["x"], "max_docs": -1}]}},
     "ingest.sources.0.text.max_docs: Input should be greater than or equal to 1"),
    ({"ingets": {}}, "ingets: unknown key"),
])
def test_config_errors_exit_before_any_work(tmp_path, extra, message):
    recipe = write_recipe(tmp_path / "bad.yaml", {"name": "bad", **extra})
    out = run_cli(["run", str(recipe), "--workspace", str(tmp_path / "ws")])
    assert out.returncode == 2
    assert f"error: {recipe}: {message}" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ws").exists()


def test_set_overrides_are_validated_too(tmp_path, small_recipe):
    out = run_cli(["plan", str(small_recipe), "--set", "ingest.sources.0.max_docs=zero", "-w", str(tmp_path / "ws")])
    assert out.returncode == 2 and "ingest.sources.0.jsonl.max_docs: Input should be a valid integer" in out.stderr
    out = run_cli(["plan", str(small_recipe), "--set", "ingest.sources.5.max_docs=1"])
    assert out.returncode == 2 and "'5' is not an index of a list of 2" in out.stderr


def test_bad_yaml_in_a_file_or_a_set_value_names_the_line_or_the_override(tmp_path, small_recipe):
    from flows.recipe import RecipeError, load_recipe

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\n  seed: [\n")
    with pytest.raises(RecipeError, match=rf"^{broken}: not valid YAML at line 2, column 7: mapping values"):
        load_recipe(broken)
    with pytest.raises(RecipeError, match=r"^--set 'seed=\[1': the value is not valid YAML \(line 1, column 3"):
        load_recipe(small_recipe, ["seed=[1"])


def test_a_broken_from_recipe_stops_plan_and_run_before_any_work(tmp_path, small_recipe):
    from flows.recipe import RecipeError, load_recipe

    recipe = write_recipe(tmp_path / "borrow.yaml", {**json.loads(small_recipe.read_text()), "name": "borrow",
                                                      "tokenizer": {"from_recipe": str(tmp_path / "gone.yaml")}})
    for command in ("plan", "run"):
        out = run_cli([command, str(recipe), "-w", str(tmp_path / "ws")])
        assert out.returncode == 2, out.stderr[-2000:]
        assert out.stderr == f"error: {recipe}: tokenizer.from_recipe: {tmp_path / 'gone.yaml'}: cannot read recipe: " \
                             "No such file or directory\n"
        assert not (tmp_path / "ws").exists()
    recipe.write_text(recipe.read_text().replace(str(tmp_path / "gone.yaml"), str(small_recipe)))
    with pytest.raises(RecipeError, match=rf"^{recipe}: tokenizer.from_recipe: {small_recipe} has no tokenizer stage"):
        load_recipe(recipe)
    recipe.write_text(recipe.read_text().replace(str(small_recipe), str(recipe)))
    with pytest.raises(RecipeError, match="refers back to itself"):
        load_recipe(recipe)


def test_catalog_export_onto_a_file_is_one_error_line(tmp_path):
    from storage.catalog import Catalog

    (tmp_path / "ws").mkdir()
    Catalog(tmp_path / "ws" / "catalog.duckdb")
    (tmp_path / "taken").write_text("not a folder")
    out = run_cli(["catalog", "-w", str(tmp_path / "ws"), "--export", str(tmp_path / "taken")])
    assert out.returncode == 1 and out.stderr == f"error: --export {tmp_path / 'taken'}: File exists\n", out.stderr


def test_run_twice_reuses_every_stage_across_processes(tmp_path, small_recipe, cli):
    ws = tmp_path / "ws"
    first = cli(["run", str(small_recipe), "--workspace", str(ws)])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "built" in first.stdout
    plan = cli(["plan", str(small_recipe), "--workspace", str(ws)])
    assert "ingest     " in plan.stdout and "cached" in plan.stdout and "not in recipe" in plan.stdout
    second = cli(["run", str(small_recipe), "--workspace", str(ws)])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "cached" in second.stdout and "built" not in second.stdout
    rows = catalog_rows(ws, "select stage, cached, status from stage_runs order by started_at")
    assert rows == [("ingest", False, "finished"), ("ingest", True, "finished")]
    assert catalog_rows(ws, "select status from pipeline_runs") == [("finished",), ("finished",)]
    stats = dict(catalog_rows(ws, "select name, value from stage_stats where stage = 'ingest'"))
    assert stats["docs_out"] == 48 and stats["docs_in"] == 48
    shown = cli(["catalog", "select stage, cached from stage_runs order by started_at", "--workspace", str(ws)])
    assert shown.returncode == 0 and "(2 rows)" in shown.stdout and "True" in shown.stdout
    assert_mlflow_parent_with_nested_stage_runs(ws)


def assert_mlflow_parent_with_nested_stage_runs(ws: Path) -> None:
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {p.info.run_id for p in parents}
    assert all(r.info.status == "FINISHED" for r in runs)
    built = [c for c in children if c.data.tags["lmforge.cached"] == "false"][0]
    assert built.data.metrics["docs_out"] == 48 and built.data.params["sources.0.name"] == "dolma"
    assert built.data.tags["lmforge.fingerprint"] == next((ws / "stages/ingest").iterdir()).name


def test_force_recomputes_and_a_deleted_output_is_never_cached(tmp_path, small_recipe, cli):
    ws = tmp_path / "ws"
    assert cli(["run", str(small_recipe), "-w", str(ws)]).returncode == 0
    forced = cli(["run", str(small_recipe), "-w", str(ws), "--force", "ingest"])
    assert forced.returncode == 0 and "built" in forced.stdout, forced.stderr[-2000:]
    stage_dir = next((ws / "stages/ingest").iterdir())
    (stage_dir / "_SUCCESS.json").unlink()   # Prefect still remembers a result; _SUCCESS.json decides
    again = cli(["run", str(small_recipe), "-w", str(ws)])
    assert again.returncode == 0 and "built" in again.stdout
    assert [r[0] for r in catalog_rows(ws, "select cached from stage_runs order by started_at")] == [False, False, False]


def test_stage_selection_errors(tmp_path, small_recipe, cli):
    out = cli(["run", str(small_recipe), "-w", str(tmp_path / "ws"), "--only", "pretrain"])
    assert out.returncode == 1 and "stage 'pretrain' is not in this recipe" in out.stderr


def big_jsonl(path: Path, shared_data: Path, copies: int) -> Path:
    """A large real-text JSONL (tiny Shakespeare blocks, repeated), so ingest runs long enough to be killed."""
    blocks = (shared_data / "raw/tinyshakespeare_input.txt").read_text().split("\n\n")
    with open(path, "w") as out:
        for copy in range(copies):
            for i, block in enumerate(blocks):
                out.write(json.dumps({"id": f"{copy}-{i}", "text": block}) + "\n")
    return path


def wait_for_parquet_in_temp_dir(ws: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if list((ws / "stages").glob("ingest/*.tmp-*/*/part-*.parquet")):
            return
        time.sleep(0.05)
    raise AssertionError(f"the stage never started writing (exit {proc.poll()})")


def big_recipe(tmp_path: Path, shared_data: Path) -> Path:
    data = big_jsonl(tmp_path / "big.jsonl", shared_data, copies=40)
    return write_recipe(tmp_path / "big.yaml", {"name": "big", "ingest": {"sources": [
        {"name": "plays", "kind": "jsonl", "paths": [str(data)]}]}})


def start_run_and_wait_for_output(recipe: Path, ws: Path) -> subprocess.Popen:
    """`lmforge run` in its own process group, returned once the stage is writing into its temp dir."""
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(recipe), "-w", str(ws)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_for_parquet_in_temp_dir(ws, proc)
    return proc


def output_hashes(ws: Path) -> dict[str, str]:
    stage = next(p for p in (ws / "stages/ingest").iterdir() if ".tmp-" not in p.name)
    success = json.loads((stage / "_SUCCESS.json").read_text())
    return {f["path"]: f["sha256"] for f in success["files"]}


def test_sigkill_mid_stage_leaves_nothing_read_and_rerun_is_byte_identical(tmp_path, shared_data, cli):
    recipe = big_recipe(tmp_path, shared_data)
    ws = tmp_path / "killed"
    proc = start_run_and_wait_for_output(recipe, ws)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not [p for p in (ws / "stages/ingest").iterdir() if ".tmp-" not in p.name]   # nothing committed
    assert "pending" in cli(["plan", str(recipe), "-w", str(ws)]).stdout
    rerun = cli(["run", str(recipe), "-w", str(ws)])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not list((ws / "stages/ingest").glob("*.tmp-*"))   # the crashed attempt's leftovers are gone
    clean = tmp_path / "clean"
    assert cli(["run", str(recipe), "-w", str(clean)]).returncode == 0
    assert output_hashes(ws) == output_hashes(clean)
    statuses = catalog_rows(ws, "select status from pipeline_runs order by started_at")
    assert statuses == [("killed",), ("finished",)]   # the dead run was marked at the next start
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id], order_by=["start_time ASC"])
    assert [r.info.status for r in runs if "mlflow.parentRunId" not in r.data.tags] == ["KILLED", "FINISHED"]


def test_sigterm_ends_runs_killed_not_running(tmp_path, shared_data, cli):
    recipe = big_recipe(tmp_path, shared_data)
    ws = tmp_path / "ws"
    proc = start_run_and_wait_for_output(recipe, ws)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert catalog_rows(ws, "select status from pipeline_runs") == [("killed",)]
    assert catalog_rows(ws, "select status from stage_runs") == [("killed",)]
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED"]
    assert not list((ws / "stages/ingest").glob("*.tmp-*"))


def run_statuses(stdout: str) -> dict[str, str]:
    """`lmforge run`'s closing summary as stage -> cached/built."""
    return {line.split()[0]: line.split()[2] for line in stdout.splitlines() if line.startswith("  ")}


def test_force_rebuilds_later_stages_only_if_the_output_changed(tmp_path, shared_data, cli):
    recipe = write_recipe(tmp_path / "tok.yaml", {"name": "tok", "ingest": {"sources": [
        {"name": "dolma", "kind": "jsonl", "paths": [str(shared_data / "raw/dolma_ccnet_cc_en_head-0091.jsonl")]}]},
        "tokenizer": {"vocab_size": 300, "heldout_docs": 2}, "shard": {"val_fraction": 0.1}})
    ws = tmp_path / "ws"
    assert cli(["run", str(recipe), "-w", str(ws)]).returncode == 0
    forced = cli(["run", str(recipe), "-w", str(ws), "--force", "tokenizer"])
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert run_statuses(forced.stdout) == {"ingest": "cached", "tokenizer": "built", "shard": "cached"}  # same tokenizer, same shards
    success = next((ws / "stages/tokenizer").iterdir()) / "_SUCCESS.json"
    record = json.loads(success.read_text())
    success.write_text(json.dumps({**record, "output_digest": "0" * 64}))   # as if its output had changed
    plan = cli(["plan", str(recipe), "-w", str(ws)]).stdout
    status = {line.split()[0]: line.split(maxsplit=2)[2] for line in plan.splitlines()[1:]}
    assert [status["ingest"], status["tokenizer"], status["shard"]] == ["cached", "cached", "pending"]
    rebuilt = cli(["run", str(recipe), "-w", str(ws)])
    assert run_statuses(rebuilt.stdout) == {"ingest": "cached", "tokenizer": "cached", "shard": "built"}


def test_the_flow_parameters_are_the_pipeline_config():
    from flows.pipeline import pipeline

    schema = pipeline.parameters.model_dump()
    assert schema["required"] == ["config"]
    config_schema = schema["definitions"]["PipelineConfig"]["properties"]
    assert {"ingest", "curate", "dedup", "tokenizer", "shard", "seed"} <= set(config_schema)


def test_a_stage_error_is_one_line_without_tracebacks(tmp_path, cli):
    recipe = write_recipe(tmp_path / "bad.yaml", {"name": "bad", "ingest": {"sources": [
        {"name": "txt", "kind": "text", "paths": [str(tmp_path / "missing/*.txt")]}]}})
    out = cli(["run", str(recipe), "-w", str(tmp_path / "ws")])
    assert out.returncode == 1
    assert (f"error: source 'txt' yielded no documents (problems: missing_file ({tmp_path / 'missing/*.txt'}: "
            "no file matches))") in out.stderr
    assert "Traceback" not in out.stderr and "StageError" not in out.stderr, out.stderr[-3000:]
    verbose = cli(["run", str(recipe), "-w", str(tmp_path / "ws"), "-v"])
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr       # -v shows where it came from
    assert catalog_rows(tmp_path / "ws", "select status from stage_runs") == [("failed",), ("failed",)]


def test_two_runs_started_at_once_on_a_fresh_workspace_both_finish_and_build_each_stage_once(
        tmp_path, shared_data, prefect_api):
    recipe = write_recipe(tmp_path / "race.yaml", {"name": "race", "ingest": {"sources": [
        {"name": "dolma", "kind": "jsonl", "paths": [str(shared_data / "raw/dolma_ccnet_cc_en_head-0091.jsonl")]},
        {"name": "cc", "kind": "warc", "paths": [str(shared_data / "raw/*.warc.gz")]}]},
        "tokenizer": {"vocab_size": 300, "heldout_docs": 2}, "shard": {"val_fraction": 0.1}})
    ws = tmp_path / "fresh"
    command = [sys.executable, "-m", "flows.cli", "run", str(recipe), "-w", str(ws), "--until", "shard"]
    procs = [subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
    rows = catalog_rows(ws, "select stage, count(*) filter (not cached), count(*) from stage_runs group by stage")
    assert sorted(rows) == [("ingest", 1, 2), ("shard", 1, 2), ("tokenizer", 1, 2)]   # built once, used twice
    assert catalog_rows(ws, "select status, count(*) from pipeline_runs group by status") == [("finished", 2)]
