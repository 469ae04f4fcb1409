"""Evaluate throughput: batched multiple-choice scoring vs one forward pass per choice; bits-per-byte tokens/s.

The model: the demo's GPT shape (4 layers, 256 wide, seq_len 128; random weights: speed does not
depend on them) over a 4096-id BPE trained on WikiText-2 first, or a real pretrain output
(`--model DIR --tokenizer DIR`). Measured in the same run, on the same requests:

- multiple choice, ARC-Easy dev 0-shot and 5-shot: the evaluate stage's path (`score_loglikelihood_task`:
  prompts, tokens, batched windows of at most `batch_tokens`, only the continuation positions
  through the output layer) vs the reference, a plain loop that runs each choice in its own forward
  pass and takes the log-softmax of all its logits (what a first implementation does). Goal: >= 3x.
  The two must agree on every log-likelihood (the largest difference is printed).
- held-out bits per byte on WikiText-2: the stage's strided scorer (stride = seq_len, and seq_len / 2)
  in scored tokens/s, vs the same windows one forward pass at a time.

The stage and its reference take turns `--repeat` times; the best of each is reported (the machine may
be shared, and turns slow both alike).

    python benchmarks/evaluate.py             # 150 ARC items, 50k characters of WikiText-2 (~6 min on 2 cores)
    python benchmarks/evaluate.py --quick     # 40 items, 10k characters (~1.5 min)
    python benchmarks/evaluate.py --device cuda   # bf16 autocast on a GPU
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DO_NOT_TRACK", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from storage.formats import ModelSpec  # noqa: E402
from tasks.datasets.multiple_choice import read_choice_file  # noqa: E402
from tasks.evaluate.config import TaskSpec  # noqa: E402
from tasks.evaluate.heldout import causal_lm  # noqa: E402
from tasks.evaluate.prompts import draw_demonstrations, encode_pairs, fewshot_prefix  # noqa: E402
from tasks.evaluate.scoring import Scorer, request_window, strided_windows  # noqa: E402
from tasks.evaluate.suite import LM, score_loglikelihood_task  # noqa: E402
from tasks.models import GPT, load_pretrained  # noqa: E402
from tasks.training.runtime import autocast  # noqa: E402

DATA = (ROOT / ".." / "shared" / "data").resolve()
ARC = DATA / "multiple_choice" / "arc_easy" / "ARC-Easy-Dev.jsonl"
WIKITEXT = DATA / "raw" / "wikitext-2_test.txt"
SPECIALS = ["<|endoftext|>", "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"]


def demo_model(work: Path, device: torch.device):
    """A demo-shaped GPT with random weights and a 4096-id BPE trained on WikiText-2."""
    from tasks.tokenizer import load_encoding
    from tasks.tokenizer.config import GPT4_PATTERN
    from tasks.tokenizer.files import save_vocabulary, with_specials
    from tasks.tokenizer.stage import train_ranks

    ranks = train_ranks(iter([WIKITEXT.read_text(encoding="utf-8")]), 4096 - len(SPECIALS), GPT4_PATTERN)
    save_vocabulary(with_specials(ranks, GPT4_PATTERN, SPECIALS, "rustbpe"), work)
    encoding = load_encoding(work)
    spec = ModelSpec(arch="gpt", n_layer=4, n_head=4, d_model=256, d_mlp=1024, seq_len=128, vocab_size=4096,
                     padded_vocab_size=4096, special_tokens={"<|endoftext|>": encoding.eot_token})
    torch.manual_seed(0)
    return GPT(spec).to(device).eval(), spec, encoding


def paired(stage: Callable[[], object], plain: Callable[[], object],
           repeat: int) -> tuple[float, object, float, object]:
    """Best time and result of each, the two taking turns (a shared machine slows both alike)."""
    times: dict[str, list[float]] = {"stage": [], "plain": []}
    results: dict[str, object] = {}
    for _ in range(repeat):
        for name, fn in (("stage", stage), ("plain", plain)):
            start = time.perf_counter()
            results[name] = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return min(times["stage"]), results["stage"], min(times["plain"]), results["plain"]


@torch.no_grad()
def plain_window_logprob(model: GPT, spec: ModelSpec, inputs: list[int], targets: list[int], n_scored: int,
                         device: torch.device, precision: str) -> float:
    """The reference: one forward pass, the log-softmax of every logit, the scored targets summed."""
    with autocast(device, precision):
        logits = model(torch.tensor([inputs], device=device)).logits[0, :, : spec.vocab_size]
    logprobs = F.log_softmax(logits.float(), dim=-1)
    wanted = torch.tensor(targets, device=device)[:, None]
    return float(logprobs.gather(1, wanted)[-n_scored:].sum())


def plain_choice_loop(task: TaskSpec, items, pool, lm: LM, device: torch.device, precision: str) -> list[list[float]]:
    """Every choice of every item in its own forward pass (same prompts and tokens as the stage)."""
    scorer, spec = lm.scorer, lm.scorer.spec
    out = []
    for item in items:
        prefix = fewshot_prefix(draw_demonstrations(item, pool, task.num_fewshot, f"evaluate-fewshot:1234:{task.name}"))
        pairs = [(prefix + c, k) for c, k in zip(item.contexts, item.continuations)]
        lls = []
        for context, continuation in encode_pairs(lm.encoding, pairs, lm.eot):
            w = request_window(context, continuation, spec.seq_len)
            lls.append(plain_window_logprob(scorer.model, spec, w.inputs, w.targets, w.n_scored, device, precision))
        out.append(lls)
    return out


def multiple_choice(lm: LM, items, shots: int, repeat: int, device: torch.device, precision: str) -> dict:
    task = TaskSpec(name=f"arc_easy_{shots}shot", format="arc", path=str(ARC), num_fewshot=shots)
    # the items whose continuations fit, as the stage keeps them, so both sides score the same requests
    kept = {row.id for row in score_loglikelihood_task(task, items, items, lm, 1234).rows}
    same = [item for item in items if item.id in kept]
    stage_s, result, plain_s, plain = paired(lambda: score_loglikelihood_task(task, same, items, lm, 1234),
                                             lambda: plain_choice_loop(task, same, items, lm, device, precision),
                                             repeat)
    gap = max(abs(a - b) for row, lls in zip(result.rows, plain) for a, b in zip(row.loglikelihoods, lls))
    return {"examples": len(result.rows), "stage_s": stage_s, "plain_s": plain_s, "gap": gap}


def heldout(lm: LM, text: str, stride: int, repeat: int, device: torch.device, precision: str) -> dict:
    scorer = lm.scorer
    windows = strided_windows(lm.encoding.encode_ordinary(text), lm.eot, scorer.spec.seq_len, stride)
    stage_s, found, plain_s, nll = paired(
        lambda: causal_lm(scorer, lm.encoding, text, stride),
        lambda: -sum(plain_window_logprob(scorer.model, scorer.spec, w.inputs, w.targets, w.n_scored, device,
                                          precision) for w in windows), repeat)
    return {"tokens": found["tokens"], "stage_s": stage_s, "plain_s": plain_s, "bpb": found["bpb"],
            "gap": abs(found["loss"] * found["tokens"] - nll) / found["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 ARC items, 10k characters")
    parser.add_argument("--model", type=Path, help="a pretrain output (default: the demo shape, random weights)")
    parser.add_argument("--tokenizer", type=Path, help="its tokenizer stage output (with --model)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    if args.model:
        from tasks.tokenizer import load_encoding

        model, spec = load_pretrained(args.model, device, args.tokenizer)
        encoding = load_encoding(args.tokenizer)
    else:
        import tempfile

        model, spec, encoding = demo_model(Path(tempfile.mkdtemp(prefix="evalbench-")), device)
    lm = LM(Scorer(model, spec, device, precision, args.batch_tokens), encoding)
    items = read_choice_file("arc", ARC).items[: 40 if args.quick else 150]
    text = WIKITEXT.read_text(encoding="utf-8")[: 10_000 if args.quick else 50_000]
    print(f"model: {spec.n_layer} layers, d={spec.d_model}, seq_len={spec.seq_len}, vocab={spec.vocab_size}; "
          f"device {device.type} ({precision}), {torch.get_num_threads()} threads, batch_tokens {args.batch_tokens}")
    header = f"{'examples/s':>11} {'plain loop':>11} {'speed-up':>9}"
    print(f"\n{'multiple choice (ARC-Easy)':<30} {header} {'max |dll|':>10}")
    for shots in (0, 5):
        r = multiple_choice(lm, items, shots, args.repeat, device, precision)
        label = f"{shots}-shot, {r['examples']} items"
        print(f"{label:<30} {r['examples'] / r['stage_s']:>11.1f} {r['examples'] / r['plain_s']:>11.1f} "
              f"{r['plain_s'] / r['stage_s']:>8.1f}x {r['gap']:>10.1e}")
    print(f"\n{'bits per byte (WikiText-2)':<30} {'tokens/s':>11} {header[12:]} {'|dloss|':>10}")
    for stride in (spec.seq_len, spec.seq_len // 2):
        r = heldout(lm, text, stride, args.repeat, device, precision)
        label = f"stride {stride}, {r['tokens']} tokens"
        print(f"{label:<30} {r['tokens'] / r['stage_s']:>11.0f} {r['tokens'] / r['plain_s']:>11.0f} "
              f"{r['plain_s'] / r['stage_s']:>8.1f}x {r['gap']:>10.1e}")


if __name__ == "__main__":
    main()
