"""`lmforge sbatch`: a Slurm batch script that pretrains a recipe on `pretrain.nnodes` nodes.

The script runs one task per node, on a workspace every node mounts at the same path:

1. on the first node, `lmforge run --until <the stage before pretrain>` builds what pretrain reads
   (cached: seconds) and `lmforge plan` checks the recipe still plans the pretrain fingerprint the
   script was written for (the other nodes read that fingerprint's trainer JSON);
2. `srun` starts one task per node. Node 0 runs the stage itself (`lmforge run --only pretrain`),
   so the output is committed and recorded in the catalog and MLflow exactly as on one machine; it
   writes the trainer JSON and starts its torchrun agent. Every other node waits for that JSON (the
   script deleted the last job's copy first), then starts its agent (`worker_command(config, spec,
   node_rank)`). The agents meet at torchrun's c10d rendezvous on the allocation's first node.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from flows.recipe import apply_overrides, load_recipe, read_yaml_mapping
from storage.workspace import Workspace
from tasks.pretrain.stage import RUN_DIR, SPEC_FILE, worker_command

REPO_ROOT = Path(__file__).resolve().parents[2]
# set at run time: by the script (the head node's endpoint, the trainer JSON), by srun (the node's index)
ENDPOINT, SPEC, NODE = "$RDZV_ENDPOINT", "$SPEC", "$SLURM_NODEID"


class SlurmError(ValueError):
    """A recipe or option that cannot make a multi-node job; the message names the setting."""


@dataclass(frozen=True)
class SlurmOptions:
    """The `#SBATCH` resources and the rendezvous port."""

    partition: str | None = None
    time: str | None = None
    gpus_per_node: int | None = None       # None: pretrain.nproc_per_node (0 when pretrain.device is cpu)
    cpus_per_task: int | None = None       # None: 8 per torchrun worker
    port: int = 29500
    spec_wait_s: int = 900                 # how long nodes 1.. wait for node 0's trainer JSON


def sbatch_script(recipe: Path, overrides: list[str], workspace: Path, options: SlurmOptions) -> str:
    """The batch script's text for `recipe` with `--set overrides`, on `workspace` (a shared path)."""
    recipe, workspace = recipe.resolve(), workspace.resolve()
    config = _multinode_recipe(recipe, overrides, options.port)
    pretrain = config.pretrain
    sets = [*overrides, f"pretrain.rdzv_endpoint={ENDPOINT}"]
    fingerprint = _pretrain_fingerprint(config, workspace)
    spec = Workspace(workspace).scratch_dir("pretrain", fingerprint) / RUN_DIR / SPEC_FILE
    enabled = config.enabled_stages()
    upstream = enabled[enabled.index("pretrain") - 1]
    lmforge = [sys.executable, "-m", "flows.cli"]
    agent = worker_command(pretrain.model_copy(update={"rdzv_endpoint": ENDPOINT}), Path(SPEC))
    agent = [f"--node-rank={NODE}" if arg == "--node-rank=0" else arg for arg in agent]
    return SCRIPT.format(
        name=config.name, fingerprint=fingerprint, nnodes=pretrain.nnodes, nproc=pretrain.nproc_per_node,
        sbatch="\n".join(f"#SBATCH {line}" for line in _sbatch_lines(config, options)),
        generated=_shell(["lmforge", "sbatch", str(recipe), *_sets(overrides), "-w", str(workspace)]),
        repo=shlex.quote(str(REPO_ROOT)), workspace=shlex.quote(str(workspace)), port=options.port,
        build=_shell([*lmforge, "run", str(recipe), "--until", upstream, "-w", str(workspace), *_sets(sets)]),
        plan=_shell([*lmforge, "plan", str(recipe), "-w", str(workspace), *_sets(sets)]),
        stage=_shell([*lmforge, "run", str(recipe), "--only", "pretrain", "-w", str(workspace), *_sets(sets)]),
        spec=shlex.quote(str(spec)), wait=options.spec_wait_s, agent=_shell(agent))


def _multinode_recipe(recipe: Path, overrides: list[str], port: int):
    """The validated recipe; its pretrain stage must be its own and span several nodes."""
    data = apply_overrides(read_yaml_mapping(recipe), overrides)
    if not isinstance(data.get("pretrain"), dict):
        raise SlurmError(f"{recipe}: no pretrain stage; `lmforge sbatch` launches pretrain on several nodes")
    if data["pretrain"].get("from_recipe"):
        raise SlurmError(f"{recipe}: pretrain.from_recipe borrows the stage: run `lmforge sbatch` on "
                         f"{data['pretrain']['from_recipe']}")
    # The head node is known only inside the job: a stand-in endpoint validates (it is not fingerprinted).
    config = load_recipe(recipe, [*overrides, f"pretrain.rdzv_endpoint=slurm-head:{port}"])
    if config.pretrain.nnodes < 2:
        raise SlurmError(f"pretrain.nnodes={config.pretrain.nnodes}: one node needs no batch script of its own; "
                         "run `lmforge run RECIPE` in an `srun`/`sbatch --wrap`, or set --set pretrain.nnodes=N")
    return config


def _pretrain_fingerprint(config, workspace: Path) -> str:
    from flows.plan import make_plan

    return next(stage.fingerprint for stage in make_plan(config, Workspace(workspace)) if stage.name == "pretrain")


def _sbatch_lines(config, options: SlurmOptions) -> list[str]:
    """`--nodes`, one task per node (its torchrun agent starts the node's workers), GPUs, CPUs, time, partition."""
    pretrain = config.pretrain
    gpus = options.gpus_per_node
    if gpus is None:
        gpus = 0 if pretrain.device == "cpu" else pretrain.nproc_per_node
    if gpus and gpus != pretrain.nproc_per_node:
        raise SlurmError(f"--gpus-per-node={gpus} but pretrain.nproc_per_node={pretrain.nproc_per_node}: torchrun "
                         f"starts one worker per GPU; pass --set pretrain.nproc_per_node={gpus}")
    if not gpus and pretrain.device == "cuda":
        raise SlurmError("--gpus-per-node=0 but pretrain.device='cuda': request GPUs or set pretrain.device=cpu")
    lines = [f"--job-name=lmforge-{config.name}-pretrain", f"--nodes={pretrain.nnodes}", "--ntasks-per-node=1",
             f"--cpus-per-task={options.cpus_per_task or 8 * pretrain.nproc_per_node}"]
    lines += [f"--gpus-per-node={gpus}"] if gpus else []
    lines += [f"--time={options.time}"] if options.time else []
    lines += [f"--partition={options.partition}"] if options.partition else []
    return lines


def _sets(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def _shell(args: list[str]) -> str:
    """A command line; words that hold a run-time variable are double-quoted so the shell expands them."""
    expanded = (ENDPOINT, SPEC, NODE)
    return " ".join(f'"{arg}"' if any(v in arg for v in expanded) else shlex.quote(arg) for arg in args)


SCRIPT = """\
#!/bin/bash
# lmforge: the pretrain stage of recipe {name!r} (fingerprint {fingerprint}) on {nnodes} nodes x {nproc} workers.
# From: {generated} (and the #SBATCH options below)
# Write it again after editing the recipe (the job checks the fingerprint and stops if it changed).
{sbatch}
set -euo pipefail
cd {repo}
export LMFORGE_WORKSPACE={workspace}
export SPEC={spec}   # the trainer JSON node 0 writes and every node's workers read
if [ "$SLURM_NNODES" != {nnodes} ]; then
  echo "error: the job has $SLURM_NNODES nodes but pretrain.nnodes={nnodes}: submit it with --nodes={nnodes}" >&2
  exit 1
fi
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export RDZV_ENDPOINT="$head_node:{port}"

# 1. What pretrain reads (cached: seconds; built here, the other nodes idle: build it beforehand if it is long).
{build}
planned=$({plan} | awk '$1 == "pretrain" {{print $2, $3}}')
case "$planned" in
  "{fingerprint} cached") echo "pretrain {fingerprint} is already built"; exit 0 ;;
  "{fingerprint} pending") ;;
  *) echo "error: the recipe now plans pretrain as '$planned', not {fingerprint}: write this script again" >&2
     exit 1 ;;
esac
rm -f "$SPEC"   # node 0 writes it afresh; the other nodes wait for it

# 2. One task per node: node 0 runs the stage (and its torchrun agent), the others their torchrun agent.
read -r -d '' node_step <<'NODE_STEP' || true
if [ "$SLURM_NODEID" = 0 ]; then
  exec {stage}
fi
for _ in $(seq {wait}); do [ -e "$SPEC" ] && break; sleep 1; done
if [ ! -e "$SPEC" ]; then
  echo "error: node $SLURM_NODEID: node 0 wrote no $SPEC within {wait} s (see its output)" >&2
  exit 1
fi
exec {agent}
NODE_STEP
srun --kill-on-bad-exit=1 bash -c "$node_step"
"""
