"""Pretrain throughput: lmforge's trainer against a nanoGPT-style reference loop of the same shape.

Both run in this process, on the same device and thread count, one optimizer step each in turn
(the machine may be shared; a step pair sees the same load). The lmforge side is the real
trainer's step (`Trainer.train_step`, world size 1) on real Parquet token shards: its streaming
loader and prefetch thread, gradient accumulation, clipping, the loss/grad-norm reduction, AdamW.
The reference is a minimal model and loop written below in the style of nanoGPT (`model.py` +
`train.py`): SDPA attention, tied embeddings, AdamW, clipping, random windows of a token array. Default shape: 6 layers, 384 wide, 6 heads, vocab 8192, block 256,
batch 8. Printed: tokens/s, step time, MFU (6N + 12 L d T FLOPs per token over the device's peak,
an estimate on CPUs), the share of step time spent waiting on data, and lmforge/reference ratios.

    python benchmarks/pretrain.py --quick        # fp32 and bf16, a few steps: well under a minute
    python benchmarks/pretrain.py                # more steps, plus bf16 + torch.compile
    python benchmarks/pretrain.py --gpu          # gpt2-124m, bf16 + compile on CUDA (benchmarks/gpu.sh)
    python benchmarks/pretrain.py --generate     # GPT.generate: KV cache against recomputing the prefix
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This script's folder must not shadow any package it imports.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from storage.formats import ShardEntry, ShardManifest  # noqa: E402
from storage.stage import StageContext  # noqa: E402
from tasks.models import GPT, build_model, flops_per_token  # noqa: E402
from tasks.pretrain.config import ModelConfig, PretrainConfig  # noqa: E402
from tasks.pretrain.objectives import make_objective  # noqa: E402
from tasks.pretrain.stage import trainer_spec  # noqa: E402
from tasks.training.loop import Trainer  # noqa: E402
from tasks.training.runtime import DistEnv, autocast  # noqa: E402

SHAKESPEARE = ROOT / ".." / "shared" / "data" / "raw" / "tinyshakespeare_input.txt"


@dataclass
class Result:
    name: str
    precision: str
    compiled: bool
    tokens_per_s: float            # at the fastest timed step (the machine may be shared)
    step_s: float                  # the fastest timed step
    median_step_s: float
    mfu: float | None              # None: the device's peak is unknown
    data_wait_share: float
    step_times: list[float]


# ---- the reference: a nanoGPT-style model and loop ------------------------------------------


class RefAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.c_attn, self.c_proj, self.n_head = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), RefAttention(d, heads), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    def __init__(self, vocab: int, block: int, layers: int, d: int, heads: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(RefBlock(d, heads) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


class Reference:
    """nanoGPT's training step on `RefGPT`, one call per optimizer step."""

    def __init__(self, args: argparse.Namespace, tokens: np.ndarray, precision: str, compiled: bool,
                 device: torch.device) -> None:
        torch.manual_seed(0)
        self.model = RefGPT(args.vocab, args.seq_len, args.n_layer, args.d_model, args.n_head).to(device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
        self.forward = torch.compile(self.model) if compiled else self.model
        self.args, self.tokens, self.precision, self.device = args, tokens, precision, device

    def step(self) -> tuple[float, float]:
        """(seconds, seconds spent fetching the batch)."""
        start = time.perf_counter()
        x, y = ref_batch(self.tokens, self.args.batch * self.args.accum, self.args.seq_len, self.device)
        waited = time.perf_counter() - start
        with autocast(self.device, self.precision):
            loss = self.forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()                                            # nanoGPT syncs on the loss to log it
        return time.perf_counter() - start, waited


def ref_batch(tokens: np.ndarray, batch: int, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch: random windows of one long token array."""
    starts = np.random.randint(0, len(tokens) - block - 1, batch)
    x = torch.stack([torch.from_numpy(tokens[i: i + block].astype(np.int64)) for i in starts])
    y = torch.stack([torch.from_numpy(tokens[i + 1: i + 1 + block].astype(np.int64)) for i in starts])
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


# ---- lmforge: the real trainer on real shards ------------------------------------------------


def corpus_tokens(vocab: int, count: int) -> np.ndarray:
    """Tiny Shakespeare's bytes when ../shared/data is there (ids < 256), else random ids, to `count`."""
    if SHAKESPEARE.is_file():
        data = np.frombuffer(SHAKESPEARE.read_bytes(), dtype=np.uint8).astype(np.uint32)
    else:
        data = np.random.default_rng(0).integers(0, vocab - 1, 1 << 20, dtype=np.uint32)
    return np.resize(data, count)


def write_shards(directory: Path, tokens: np.ndarray, vocab: int, doc_tokens: int = 2048) -> Path:
    """The shard stage's format: one row per ~2k-token document, 64 rows per row group, all train."""
    (directory / "shards").mkdir(parents=True)
    n_docs = -(-len(tokens) // doc_tokens)
    dtype = pa.uint16() if vocab <= 65536 else pa.uint32()
    offsets = pa.array(np.minimum(np.arange(n_docs + 1) * doc_tokens, len(tokens)).astype(np.int32))
    lists = pa.ListArray.from_arrays(offsets, pa.array(tokens.astype(np.uint16 if vocab <= 65536 else np.uint32)))
    table = pa.table({"doc_id": [f"doc-{i}" for i in range(n_docs)], "source": ["bench"] * n_docs,
                      "split": ["train"] * n_docs, "tokens": lists})
    pq.write_table(table, directory / "shards" / "shard-00000.parquet", compression="zstd", row_group_size=64)
    shard = ShardEntry(path="shards/shard-00000.parquet", rows=n_docs, tokens=len(tokens), tokens_train=len(tokens),
                       tokens_val=0)
    ShardManifest(vocab_size=vocab, token_dtype=str(dtype), eot_token="<|endoftext|>", eot_id=vocab - 1,
                  special_tokens={"<|endoftext|>": vocab - 1}, val_fraction=0.0, split_rule="all train (benchmark)",
                  max_tokens_per_doc=None, overlong="split", split_doc_id_format="<doc_id>#<part>", shards=[shard],
                  tokens_by_source={"bench": {"train": len(tokens), "val": 0}},
                  total_tokens=len(tokens)).write(directory / "manifest.json")
    return directory


def lmforge_config(args: argparse.Namespace, precision: str, compiled: bool) -> PretrainConfig:
    model = {"preset": args.preset, "n_layer": args.n_layer, "n_head": args.n_head, "d_model": args.d_model,
             "d_mlp": 4 * args.d_model, "seq_len": args.seq_len}
    return PretrainConfig.model_validate({
        "model": model, "batch_tokens": args.batch * args.seq_len * args.accum, "micro_batch": args.micro_batch,
        "max_steps": args.warmup + args.steps, "precision": precision, "compile": compiled, "device": args.device,
        "optim": {"warmup_steps": 1}, "log_every": 1, "eval_every": 0, "checkpoint_every": 0, "progress": False})


def lmforge_trainer(args: argparse.Namespace, shards: Path, work: Path, precision: str, compiled: bool,
                    env: DistEnv) -> Trainer:
    scratch = Path(tempfile.mkdtemp(dir=work))            # fresh: nothing to resume from
    ctx = StageContext("pretrain", "bench", scratch / "out", scratch, {"shard": shards}, work, seed=0)
    spec = trainer_spec(lmforge_config(args, precision, compiled), ctx)
    Path(spec.loop.run_dir).mkdir(parents=True)
    return Trainer(spec.loop, make_objective(spec), env)


def measure(args: argparse.Namespace, shards: Path, work: Path, tokens: np.ndarray, precision: str,
            compiled: bool, env: DistEnv, flops: float) -> list[Result]:
    """Steps of lmforge and the reference in turn; the warm-up steps are dropped."""
    trainer = lmforge_trainer(args, shards, work, precision, compiled, env)
    reference = None if args.gpu else Reference(args, tokens, precision, compiled, env.device)
    batches = trainer.train_batches()
    mine, ref = [], []
    try:
        for step in range(1, args.warmup + args.steps + 1):
            if reference is not None and step % 2:
                ref.append(reference.step())
            result = trainer.train_step(step, batches)
            mine.append((result.seconds, result.data_wait))
            if reference is not None and not step % 2:
                ref.append(reference.step())
    finally:
        batches.close()
    tokens_per_step = trainer.cfg.sequences_per_rank * trainer.spec.seq_len
    results = [summarize("lmforge", precision, compiled, mine[args.warmup:], tokens_per_step, flops, trainer.peak)]
    if ref:
        results.insert(0, summarize("reference", precision, compiled, ref[args.warmup:], tokens_per_step, flops,
                                    trainer.peak))
    return results


def summarize(name: str, precision: str, compiled: bool, steps: list[tuple[float, float]], tokens: int,
              flops: float, peak: float | None) -> Result:
    times = [t for t, _ in steps]
    rate = tokens / min(times)
    return Result(name, precision, compiled, rate, min(times), statistics.median(times),
                  rate * flops / peak if peak else None, sum(w for _, w in steps) / sum(times), times)


# ---- running and printing --------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fp32 + bf16, few steps (well under a minute)")
    parser.add_argument("--gpu", action="store_true", help="gpt2-124m, bf16 + compile on CUDA, lmforge only")
    parser.add_argument("--generate", action="store_true", help="GPT.generate with and without the KV cache")
    parser.add_argument("--new-tokens", type=int, default=None, help="--generate: tokens to generate (default seq_len)")
    parser.add_argument("--preset", default="gpt-mini")
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-head", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (lmforge)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=None, help="turns each side takes per configuration")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile configuration")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, all cores)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.micro_batch = args.batch
    if args.gpu:
        # GPT-2 small as released, nanoGPT's 0.5M-token batch; micro_batch=None probes the largest that fits.
        args.preset, args.n_layer, args.n_head, args.d_model, args.seq_len, args.vocab = \
            "gpt2-124m", 12, 12, 768, 1024, 50257
        args.device, args.micro_batch, args.batch, args.accum = "cuda", None, 512, 1
    args.steps = args.steps or (2 if args.quick else 20 if args.gpu else 8)
    args.warmup = args.warmup or (1 if args.quick else 5 if args.gpu else 2)
    args.rounds = args.rounds or 1
    return args


def configurations(args: argparse.Namespace) -> list[tuple[str, bool]]:
    if args.gpu:
        return [("bf16", True)]
    configs = [("fp32", False), ("bf16", False)]
    return configs if args.quick or args.no_compile else [*configs, ("bf16", True)]


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.generate:
        return generate_speed(args, device)
    if args.gpu and device.type != "cuda":
        raise SystemExit("--gpu needs a CUDA device and a torch build that sees it")
    env = DistEnv(rank=0, local_rank=0, world=1, device=device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens_needed = (args.warmup + args.steps) * args.batch * args.accum * (args.seq_len + 1) + (1 << 18)
    tokens = corpus_tokens(args.vocab, max(tokens_needed, 1 << 20))
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else torch.get_num_threads()} "
          f"{'GPU' if device.type == 'cuda' else 'CPU threads'}), torch {torch.__version__}; shape: "
          f"{args.n_layer} layers, {args.d_model} wide, {args.n_head} heads, vocab {args.vocab}, block {args.seq_len}, "
          f"batch {args.batch}x{args.accum}; {args.warmup} warm-up + {args.steps} timed steps; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results: list[Result] = []
    flops = shape_flops(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = write_shards(work / "shard", tokens, args.vocab)
        for precision, compiled in configurations(args):
            for _ in range(args.rounds):
                results += measure(args, shards, work, tokens, precision, compiled, env, flops)
                print(f"  measured {precision}{' + compile' if compiled else ''}", flush=True)
    report(results, args)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (above ~0 another job shared the cores)")


def shape_flops(args: argparse.Namespace) -> float:
    """Training FLOPs per token of the benchmark shape, by lmforge's formula (6N + 12 L d T)."""
    spec = ModelConfig(preset=args.preset, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                       d_mlp=4 * args.d_model, seq_len=args.seq_len).resolve(args.vocab, {"<|endoftext|>": 0})
    with torch.device("meta"):
        return flops_per_token(build_model(spec), spec)


def report(results: list[Result], args: argparse.Namespace) -> None:
    print(f"\n{'side':10} {'precision':16} {'tokens/s':>10} {'step (s)':>9} {'median':>7} {'MFU':>7} {'data wait':>10}")
    for r in results:
        label = r.precision + (" + compile" if r.compiled else "")
        mfu = f"{r.mfu:7.1%}" if r.mfu is not None else "    n/a"
        print(f"{r.name:10} {label:16} {r.tokens_per_s:10,.0f} {r.step_s:9.3f} {r.median_step_s:7.3f} {mfu} "
              f"{r.data_wait_share:10.2%}")
    print("(tokens/s and MFU at the fastest timed step; data wait = time blocked on the loader / step time)")
    print()
    for precision, compiled in configurations(args):
        mine = [r for r in results if (r.name, r.precision, r.compiled) == ("lmforge", precision, compiled)]
        ref = [r for r in results if (r.name, r.precision, r.compiled) == ("reference", precision, compiled)]
        label = precision + (" + compile" if compiled else "")
        if mine and ref:
            best = max(r.tokens_per_s for r in mine) / max(r.tokens_per_s for r in ref)
            # Steps were taken in turns, so each pair saw the same load on a shared machine.
            paired = statistics.median(a / b for m, r in zip(mine, ref) for a, b in zip(r.step_times, m.step_times))
            print(f"lmforge/reference tokens/s, {label}: {best:.2f}x (best steps), {paired:.2f}x (median of step pairs)")
        elif mine:
            mfu = [r.mfu for r in mine if r.mfu is not None]
            print(f"lmforge {label}: {max(r.tokens_per_s for r in mine):,.0f} tokens/s, "
                  f"MFU {f'{max(mfu):.1%}' if mfu else 'n/a (unknown device: pass peak_flops)'}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


def generate_speed(args: argparse.Namespace, device: torch.device) -> None:
    """Greedy continuations of a one-token prompt, cached and uncached: the same tokens, and how much faster."""
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ModelConfig(preset=args.preset, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                       d_mlp=4 * args.d_model, seq_len=args.seq_len).resolve(args.vocab, {"<|endoftext|>": 0})
    torch.manual_seed(0)
    model = GPT(spec).to(device).eval()
    prompt, new = torch.zeros((1, 1), dtype=torch.long, device=device), args.new_tokens or args.seq_len - 1
    seconds, outputs = {}, {}
    for use_cache in (True, False, True):              # the first cached run warms up
        start = time.perf_counter()
        outputs[use_cache] = model.generate(prompt, new, temperature=0, use_cache=use_cache)
        seconds[use_cache] = time.perf_counter() - start
    same = torch.equal(outputs[True], outputs[False])
    print(f"GPT.generate on {device} ({torch.get_num_threads()} threads): {args.n_layer} layers, {args.d_model} wide, "
          f"block {args.seq_len}, vocab {args.vocab}; {new} new tokens, greedy")
    print(f"  KV cache: {new / seconds[True]:8.1f} tokens/s    recompute: {new / seconds[False]:8.1f} tokens/s    "
          f"speedup {seconds[False] / seconds[True]:.1f}x    same tokens: {same}")


if __name__ == "__main__":
    main()
