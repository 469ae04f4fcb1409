"""Fine-tuning throughput: lmforge's finetune path against a plain PyTorch loop over the same model and batches.

Task: SST-2 (`../shared/data/glue/sst2`), encoded by the finetune stage's own code (data loader,
BERT/GPT-1 layout, features) with a BPE trained here on the training sentences. Model: the nano
GPT and BERT presets (2 layers, 64 wide) or `--preset`, built as the stage builds it (random init:
speed does not depend on the weights).

- Training: the real trainer's step (`Trainer.train_step`, world size 1: its prefetch thread,
  accumulation, clipping, AdamW) against a plain loop (make the micro-batches, forward, backward,
  clip, AdamW step) on an identical copy of the model, over the same micro-batches; one step of each
  in turn (the pair's order alternating), so a shared machine's load falls on both alike.
  Examples/s at the median step.
- Evaluation: the stage's `feature_logits` (longest-first batches) against a plain loop over the
  evaluation set in file order, the same batch size.
- Memory: peak RSS of this process; on CUDA the peak allocated memory of each side.

    python benchmarks/finetune.py --quick      # fp32, a few steps of each family: well under a minute
    python benchmarks/finetune.py              # fp32 and bf16, more steps
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.memory import peak_rss_mb  # noqa: E402
from storage.formats import ModelSpec  # noqa: E402
from tasks.finetune.config import FinetuneConfig  # noqa: E402
from tasks.finetune.data import BadRowCounter, load_task  # noqa: E402
from tasks.finetune.encode import Specials, make_layout  # noqa: E402
from tasks.finetune.model import HeadSpec  # noqa: E402
from tasks.finetune.objective import FinetuneObjective, WorkerSpec  # noqa: E402
from tasks.finetune.predict import feature_logits  # noqa: E402
from tasks.finetune.prepare import Preparer, QaSettings  # noqa: E402
from tasks.finetune.runs import resolve, schedule  # noqa: E402
from tasks.pretrain.config import ModelConfig  # noqa: E402
from tasks.tokenizer.config import GPT4_PATTERN  # noqa: E402
from tasks.tokenizer.files import with_specials  # noqa: E402
from tasks.tokenizer.stage import train_ranks  # noqa: E402
from tasks.training.config import LoopConfig, OptimConfig  # noqa: E402
from tasks.training.loop import Trainer  # noqa: E402
from tasks.training.runtime import DistEnv, autocast  # noqa: E402

SST2 = ROOT / ".." / "shared" / "data" / "glue" / "sst2"
SPECIALS = ["<|endoftext|>", "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"]


def encoding_for(texts: list[str], vocab: int):
    vocabulary = with_specials(train_ranks(iter(texts), vocab - len(SPECIALS), GPT4_PATTERN), GPT4_PATTERN,
                               SPECIALS, "benchmark")
    return vocabulary.encoding("benchmark"), vocabulary


def model_spec(arch: str, preset: str, vocabulary) -> ModelSpec:
    specials = vocabulary.special_tokens
    needed = {"<|endoftext|>"} if arch == "gpt" else {"[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"}
    return ModelConfig(preset=preset).resolve(vocabulary.vocab_size, {k: specials[k] for k in needed})


def prepared_sst2(arch: str, spec: ModelSpec, encoding, train_rows: int):
    section = {"name": "sst2", "kind": "glue", "train": str(SST2 / "train.head5000.tsv"), "eval": str(SST2 / "dev.tsv"),
               "max_train_examples": train_rows}
    task = FinetuneConfig.model_validate({"tasks": [section]}).tasks[0]
    data = load_task(task, 0, BadRowCounter())
    hyper = resolve(task, spec)
    if arch == "gpt":      # GPT-1's task tokens on the unused rows after the vocabulary
        first = spec.vocab_size
        specials = Specials(first, first + 1, first + 2, spec.special_tokens["<|endoftext|>"])
    else:
        ids = spec.special_tokens
        specials = Specials(ids["[CLS]"], ids["[SEP]"], ids["[SEP]"], ids["[PAD]"])
    preparer = Preparer(data, make_layout(arch, specials, hyper.max_length), encoding, QaSettings(64, 32))
    bad = BadRowCounter()
    train = preparer.prepare(data.train, True, bad, "train")
    evaluation = preparer.prepare(data.evals["sst2"], False, bad, "dev")
    head = HeadSpec(task="sst2", kind="classify", family=arch, n_outputs=2, labels=data.labels, form=data.form,
                    max_length=hyper.max_length, lm_weight=hyper.lm_weight, pad_id=specials.pad, init="random",
                    task_tokens={"start": specials.start, "delim": specials.delim, "extract": specials.extract}
                    if arch == "gpt" else {})
    return task, train, evaluation, head


def build(arch: str, spec: ModelSpec, task, train, evaluation, head, precision: str, steps: int, directory: Path):
    plan = schedule(task, FinetuneConfig.model_validate({"tasks": [task.model_dump()]}), len(train.features))
    loop = LoopConfig(name="bench", run_dir=str(directory), seed=0, max_steps=steps, sequences_per_rank=plan.per_rank,
                      micro_batch=None, optim=OptimConfig(lr=1e-4, min_lr_ratio=0.0, warmup_steps=0, decay="linear"),
                      precision=precision, device="auto", progress=False, eval_every=0, log_every=10 ** 6)
    train_path = str(train.features.save(directory / "train.npz"))
    eval_path = str(evaluation.features.save(directory / "eval.npz"))
    extra = 128 if arch == "gpt" and spec.padded_vocab_size - spec.vocab_size < 3 else 0
    worker = WorkerSpec(loop=loop, base=spec, head=head, dropout=0.1, extra_rows=extra, pretrained_dir=None,
                        train_features=train_path, eval_features=eval_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Trainer(loop, FinetuneObjective(worker), DistEnv(0, 0, 1, device)), device


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro: list[dict], device: torch.device,
               precision: str) -> None:
    """What anyone would write: forward, backward per micro-batch, clip, step."""
    for arrays in micro:
        inputs = {k: torch.as_tensor(v).to(device) for k, v in arrays.items()}
        with autocast(device, precision):
            loss = model(**inputs).loss
        (loss / len(micro)).backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_throughput(trainer: Trainer, precision: str, steps: int) -> dict[str, float]:
    """Paired steps: lmforge's train_step and the plain loop on a copy of the model, same micro-batches.

    The pair's order alternates (ABBA): on a CPU the first of two back-to-back steps on different
    weights is measurably slower (bf16 weight packing, caches), which would otherwise favour one side.
    """
    device, batch = trainer.env.device, trainer.cfg.sequences_per_rank
    plain = copy.deepcopy(trainer.model)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01)
    ours_batches = trainer.train_batches()
    plain_batches = trainer.objective.train_batches(0, 1, trainer.micro_batch, None)
    ours, reference = [], []

    def ours_step(step: int) -> None:
        ours.append(timed(lambda: trainer.train_step(step, ours_batches), device))

    def plain_once() -> None:       # a plain loop makes its batches in the loop: timed with the step
        reference.append(timed(lambda: plain_step(plain, optimizer, [next(plain_batches).arrays
                                                                    for _ in range(trainer.accum)], device,
                                                  precision), device))

    for step in range(1, steps + 1):
        if step % 2:
            ours_step(step)
            plain_once()
        else:
            plain_once()
            ours_step(step)
    ours_batches.close()
    ours_s, ref_s = statistics.median(ours[2:]), statistics.median(reference[2:])    # the first steps warm up
    return {"examples_per_s": batch / ours_s, "plain_examples_per_s": batch / ref_s, "ratio": ref_s / ours_s}


def timed(work, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def eval_throughput(model: nn.Module, evaluation, head: HeadSpec, device: torch.device, precision: str,
                    batch: int, repeats: int) -> dict[str, float]:
    model.eval()
    features, n = evaluation.features, len(evaluation.features)
    ours, reference = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        feature_logits(model, evaluation, batch, device, precision)
        sync(device)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        for first in range(0, n, batch):
            arrays = features.batch(list(range(first, min(first + batch, n))), head.pad_id)
            arrays.pop("labels")
            with autocast(device, precision):
                model(**{k: torch.as_tensor(v).to(device) for k, v in arrays.items()}).logits.float().cpu()
        sync(device)
        reference.append(time.perf_counter() - start)
    model.train()
    return {"eval_examples_per_s": n / min(ours), "plain_eval_examples_per_s": n / min(reference),
            "eval_ratio": min(reference) / min(ours)}


def run_one(arch: str, preset: str, precision: str, steps: int, train_rows: int, encoding, vocabulary) -> dict:
    spec = model_spec(arch, preset, vocabulary)
    task, train, evaluation, head = prepared_sst2(arch, spec, encoding, train_rows)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, device = build(arch, spec, task, train, evaluation, head, precision, steps, Path(tmp))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = train_throughput(trainer, precision, steps)
        result.update(eval_throughput(trainer.model, evaluation, head, device, precision, 64, 3))
        if device.type == "cuda":
            result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return {"arch": arch, "preset": preset, "precision": precision, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fp32 only, 12 steps")
    parser.add_argument("--preset", default=None, help="model preset for both families (default: gpt-nano, bert-nano)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    steps = args.steps or (12 if args.quick else 40)
    precisions = ["fp32"] if args.quick else ["fp32", "bf16"]
    texts = [line.split("\t")[0] for line in (SST2 / "train.head5000.tsv").read_text().splitlines()[1:]]
    encoding, vocabulary = encoding_for(texts, 2048)
    print(f"SST-2, batch 32, {steps} paired steps per row, device {'cuda' if torch.cuda.is_available() else 'cpu'}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':<12}{'prec':<6}{'train ex/s':>12}{'plain ex/s':>12}{'ratio':>8}{'eval ex/s':>12}"
          f"{'plain eval':>12}{'ratio':>8}")
    for arch in ("gpt", "bert"):
        for precision in precisions:
            row = run_one(arch, args.preset or f"{arch}-nano", precision, steps, 2000, encoding, vocabulary)
            print(f"{row['preset']:<12}{precision:<6}{row['examples_per_s']:>12.1f}{row['plain_examples_per_s']:>12.1f}"
                  f"{row['ratio']:>8.2f}{row['eval_examples_per_s']:>12.1f}{row['plain_eval_examples_per_s']:>12.1f}"
                  f"{row['eval_ratio']:>8.2f}" + (f"  peak {row['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in row
                                                  else ""))
    print(f"peak RSS of this process: {peak_rss_mb():.0f} MB (ratio = lmforge / plain; goal >= 0.95)")


if __name__ == "__main__":
    main()
