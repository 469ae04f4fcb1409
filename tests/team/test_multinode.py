"""`lmforge sbatch`: the Slurm script a team submits to pretrain on several nodes, run for real on loopback.

Slurm itself is not installed here, so the test plays its part: it runs the generated script with
the environment a two-node allocation sets, a `scontrol` that names 127.0.0.1 as the first node and
an `srun` that starts the node step twice (SLURM_NODEID 0 and 1) and waits for both. Everything
else is the script's own text: it builds the upstream stages, node 0 runs the stage, node 1 runs a
torchrun agent, and the two meet through the c10d rendezvous and train a gpt-nano.
"""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from cliutil import catalog_rows, free_port, run_cli, write_recipe

from tasks.pretrain.slurm import SlurmError, SlurmOptions, sbatch_script

FAKE_SCONTROL = """#!/bin/bash
# `scontrol show hostnames LIST`: the first node of this "allocation" is this machine
[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1
"""
FAKE_SRUN = """#!/bin/bash
# one task per node: the command twice, as nodes 0 and 1, in the background; fails if either fails
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 "$@" > "$SRUN_LOGS/node0.log" 2>&1 & first=$!
SLURM_NODEID=1 "$@" > "$SRUN_LOGS/node1.log" 2>&1 & second=$!
wait $first; a=$?; wait $second; b=$?
echo "node0=$a node1=$b" > "$SRUN_LOGS/exit_codes"
[ $a = 0 ] && [ $b = 0 ]
"""


def tiny_recipe(root: Path, nnodes: int = 2) -> Path:
    """Wikipedia summaries -> a 512-token BPE -> shards -> a gpt-nano on 2 nodes x 1 CPU worker, 8 steps."""
    return write_recipe(root / "multinode.yaml", {
        "name": "multinode", "seed": 3,
        "ingest": {"sources": [{"name": "wiki", "kind": "wiki_offline", "languages": ["en"], "max_docs": 300}]},
        "tokenizer": {"vocab_size": 512, "special_tokens": ["<|endoftext|>"]},
        "shard": {"val_fraction": 0.1, "row_group_rows": 32},
        "pretrain": {"model": {"preset": "gpt-nano"}, "nnodes": nnodes, "batch_tokens": 512, "micro_batch": 2,
                     "max_steps": 8, "optim": {"warmup_steps": 2}, "eval_every": 0, "checkpoint_every": 0,
                     "log_every": 1, "precision": "fp32", "device": "cpu", "progress": False,
                     "sample": {"prompts": ["The "], "max_new_tokens": 4}},
    })


def fake_slurm(bin_dir: Path) -> Path:
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755 | stat.S_IXUSR)
    return bin_dir


def test_script_is_valid_bash_and_carries_the_recipe_and_options(tmp_path: Path) -> None:
    # the README's command
    out = run_cli(["sbatch", "configs/demo.yaml", "--set", "pretrain.nnodes=2", "-w", str(tmp_path / "ws"),
                   "--partition", "gpu", "--time", "24:00:00", "--out", str(tmp_path / "pretrain.sbatch")])
    assert out.returncode == 0, out.stderr
    assert subprocess.run(["bash", "-n", str(tmp_path / "pretrain.sbatch")], check=False).returncode == 0
    script = (tmp_path / "pretrain.sbatch").read_text()
    directives = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == ["--job-name=lmforge-demo-pretrain", "--nodes=2", "--ntasks-per-node=1",
                          "--cpus-per-task=8", "--gpus-per-node=1", "--time=24:00:00", "--partition=gpu"]
    assert "--nnodes=2 --nproc-per-node=1" in script and "--rdzv-backend=c10d" in script
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in script
    assert not (tmp_path / "ws").exists()          # writing the script builds nothing


def test_options_reach_the_sbatch_lines(tmp_path: Path) -> None:
    script = sbatch_script(tiny_recipe(tmp_path), ["pretrain.nproc_per_node=4", "pretrain.device=cuda"],
                           tmp_path / "ws", SlurmOptions(cpus_per_task=20, port=29611))
    assert "#SBATCH --cpus-per-task=20\n#SBATCH --gpus-per-node=4\n" in script and "--time" not in script
    assert 'export RDZV_ENDPOINT="$head_node:29611"' in script and "--nproc-per-node=4" in script


def test_a_one_node_recipe_is_refused_with_the_setting_named(tmp_path: Path) -> None:
    out = run_cli(["sbatch", str(tiny_recipe(tmp_path)), "--set", "pretrain.nnodes=1"])
    assert out.returncode == 2, out.stderr
    assert "error: pretrain.nnodes=1: one node needs no batch script of its own" in out.stderr


@pytest.mark.parametrize("overrides, options, message", [
    (["pretrain.nproc_per_node=1"], SlurmOptions(gpus_per_node=2), "--gpus-per-node=2 but pretrain.nproc_per_node=1"),
    (["pretrain.device=cuda"], SlurmOptions(gpus_per_node=0), "--gpus-per-node=0 but pretrain.device='cuda'"),
    (["pretrain=null"], SlurmOptions(), "no pretrain stage"),
])
def test_settings_a_job_cannot_run_are_refused(tmp_path: Path, overrides: list[str], options: SlurmOptions,
                                               message: str) -> None:
    with pytest.raises(SlurmError, match=re.escape(message)):
        sbatch_script(tiny_recipe(tmp_path), overrides, tmp_path / "ws", options)


def test_the_script_trains_on_two_nodes_through_the_c10d_rendezvous(tmp_path: Path, prefect_api: str) -> None:
    recipe, ws, port = tiny_recipe(tmp_path), tmp_path / "ws", free_port()
    out = run_cli(["sbatch", str(recipe), "-w", str(ws), "--port", str(port), "--out", str(tmp_path / "job.sbatch")])
    assert out.returncode == 0, out.stderr
    logs = tmp_path / "srun-logs"
    logs.mkdir()
    # Both "nodes" share this machine's two cores: one thread each.
    env = {**os.environ, "PATH": f"{fake_slurm(tmp_path / 'bin')}:{os.environ['PATH']}", "SRUN_LOGS": str(logs),
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[01-02]", "OMP_NUM_THREADS": "1"}
    job = subprocess.run(["bash", str(tmp_path / "job.sbatch")], check=False, cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=400)
    node_logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.log")))
    assert job.returncode == 0, job.stderr[-3000:] + node_logs
    assert (logs / "exit_codes").read_text().split() == ["node0=0", "node1=0"]

    [(fingerprint, output)] = catalog_rows(ws, "select fingerprint, output_dir from stage_runs "
                                               "where stage = 'pretrain' and status = 'finished'")
    output = Path(output)
    assert (output / "_SUCCESS.json").is_file() and (output / "model" / "model.safetensors").is_file()
    assert json.loads((output / "_SUCCESS.json").read_text())["stats"]["world_size"] == 2
    assert [m["step"] for m in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())] == \
        list(range(1, 9))
    assert dict(catalog_rows(ws, f"select name, value from stage_stats where fingerprint = '{fingerprint}'"))[
        "world_size"] == 2.0
    # run again, the job finds the output built and stops before starting any node
    again = subprocess.run(["bash", str(tmp_path / "job.sbatch")], check=False, cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"pretrain {fingerprint} is already built" in again.stdout, again.stderr
