"""lmforge's curate stage vs the same datatrove steps called directly: docs/s, ratio, peak memory.

Input: the HTML pages of the real WARC files in ../shared/data/raw, replicated with distinct ids.
Both sides run FineWeb's steps (URL filter, Trafilatura, language id, Gopher, C4, FineWeb, PII) with
the same datatrove executor settings, each in a fresh subprocess. The direct side is datatrove's
ParquetReader -> steps -> ParquetWriter; lmforge adds its row-group reader, the per-source funnel
counters, the stats merge and the output linking. The URL filter and language filter are
lmforge's offline versions on both sides (datatrove's own fetch data from the network).

Peak memory is the largest sum of PSS over the stage's process tree (the stage process, datatrove's
forkserver and workers, the extraction sandboxes), sampled every 250 ms, for the lmforge stage at 1x,
2x and 4x the input, each in a fresh subprocess: the goal is flat. Most of it is the URL filter's
block lists (~1 GB in each worker process).

    python benchmarks/curate.py           # 1x = 304 pages; about 3 minutes
    python benchmarks/curate.py --quick   # 1x = 38 pages, URL filter off on both sides; well under a minute
    python benchmarks/curate.py --demo    # the demo recipe's scale: curate + dedup of 26k wiki summaries
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "tasks"))
os.environ.setdefault("DO_NOT_TRACK", "1")

import curatedata  # noqa: E402
from storage.documents import DocumentWriter  # noqa: E402

TASKS, WORKERS = 4, 2


def write_input(directory: Path, copies: int, files: int = TASKS) -> int:
    """The real WARC pages, `copies` times with distinct ids, spread over `files` files; returns the count."""
    pages = curatedata.real_warc_documents()
    docs = [replace(d, id=f"{d.id}#{n}") for n in range(copies) for d in pages]
    for index in range(files):
        with DocumentWriter(directory / f"shard{index}", row_group_rows=256) as writer:
            writer.write_all(docs[index::files])
    return len(docs)


def recipe(quick: bool, tasks: int, workers: int):
    from tasks.curate import CurateConfig

    return CurateConfig(url_filter={"enabled": not quick}, executor={"tasks": tasks, "workers": workers})


# --- the two sides, each run in a fresh subprocess ---------------------------------------------------

def run_lmforge(input_dir: Path, work: Path, quick: bool, tasks: int, workers: int) -> int:
    import tasks.curate as curate
    from storage.stage import StageContext

    (work / "out").mkdir(parents=True)
    ctx = StageContext("curate", "bench", work / "out", work / "scratch", {"documents": input_dir}, work)
    return curate.run(recipe(quick, tasks, workers), ctx).stats["docs_in"]


def run_direct(input_dir: Path, work: Path, quick: bool, tasks: int, workers: int) -> int:
    """The same steps as plain datatrove: its reader, its writer, its executor."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter

    from tasks.curate.filters import LanguageIdFilter, OfflineURLFilter
    from tasks.curate.langid import make_backend

    steps = [ParquetReader(str(input_dir), glob_pattern="**/*.parquet")]
    steps += [] if quick else [OfflineURLFilter()]
    steps += [Trafilatura(favour_precision=True, timeout=1.0), LanguageIdFilter(make_backend("pycld2"), ["en"], 0.65),
              GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(filter_no_terminal_punct=False),
              FineWebQualityFilter(), PIIFormatter(), ParquetWriter(str(work / "out"), compression="zstd")]
    LocalPipelineExecutor(steps, tasks=tasks, workers=workers, logging_dir=str(work / "logs")).run()
    stats = json.loads((work / "logs" / "stats.json").read_text())
    return int(stats[0]["stats"]["documents"]["total"])


class TreeMemory(threading.Thread):
    """Samples the memory of this process and all its descendants; keeps the peak.

    PSS (proportional set size), not RSS: datatrove's workers and their extraction sandboxes are
    forks that share most pages, and a sum of RSS would count those pages once per process.
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.done = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.done.wait(self.interval_s):
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_full_info().pss
                except psutil.Error:  # a process that ended between listing and reading
                    continue
            self.peak_bytes = max(self.peak_bytes, total)


def child(args: argparse.Namespace) -> None:
    """Runs one side once and prints its figures as JSON (the parent parses the last line)."""
    runner = run_lmforge if args.child == "lmforge" else run_direct
    sampler = TreeMemory()
    sampler.start()
    started = time.perf_counter()
    docs = runner(Path(args.input), Path(args.work), args.quick, args.tasks, args.workers)
    seconds = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    print(json.dumps({"docs": docs, "seconds": seconds, "peak_mb": sampler.peak_bytes / 2**20}))


def in_subprocess(side: str, input_dir: Path, quick: bool, tasks: int, workers: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"bench-{side}-"))
    try:
        command = [sys.executable, __file__, "--child", side, "--input", str(input_dir), "--work", str(work),
                   "--tasks", str(tasks), "--workers", str(workers)] + (["--quick"] if quick else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{side} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the comparison --------------------------------------------------------------------------------------

def warm_up() -> None:
    """Imports everything once in a throwaway process, so the first timed run does not pay cold caches."""
    subprocess.run([sys.executable, "-c", "import spacy, trafilatura, pycld2, tasks.curate.pipeline; "
                    "spacy.blank('en')"], check=True, capture_output=True)


def throughput(base: Path, copies: int, quick: bool) -> dict:
    """Both sides on the 1x input, alternating, best of `repeats`; returns lmforge's best (the 1x memory point)."""
    input_dir = base / "1x"
    docs = write_input(input_dir, copies)
    repeats = 1 if quick else 2
    print(f"throughput: {docs} documents, tasks={TASKS}, workers={WORKERS}, best of {repeats}"
          + (" (quick: URL filter off on both sides)" if quick else ""))
    warm_up()
    runs: dict[str, list[dict]] = {"datatrove direct": [], "lmforge curate": []}
    for _ in range(repeats):
        runs["datatrove direct"].append(in_subprocess("direct", input_dir, quick, TASKS, WORKERS))
        runs["lmforge curate"].append(in_subprocess("lmforge", input_dir, quick, TASKS, WORKERS))
    best = {name: min(figures, key=lambda f: f["seconds"]) for name, figures in runs.items()}
    for name, figures in best.items():
        print(f"  {name:18s} {figures['docs'] / figures['seconds']:8.1f} docs/s   ({figures['seconds']:.1f} s, "
              f"peak {figures['peak_mb']:.0f} MB)")
    direct, lmforge = best["datatrove direct"], best["lmforge curate"]
    ratio = (lmforge["docs"] / lmforge["seconds"]) / (direct["docs"] / direct["seconds"])
    print(f"  ratio lmforge/direct: {ratio:.2f}x (goal >= 0.9x)")
    return lmforge


def memory(base: Path, copies: int, quick: bool, one_x: dict) -> None:
    print(f"peak memory of the lmforge curate stage (process tree), tasks={TASKS}, workers={WORKERS}, fresh process:")
    for scale in (1, 2, 4):
        if scale == 1:
            figures = one_x
        else:
            input_dir = base / f"mem{scale}x"
            write_input(input_dir, copies * scale)
            figures = in_subprocess("lmforge", input_dir, quick, TASKS, WORKERS)
            shutil.rmtree(input_dir)
        print(f"  {scale}x {figures['docs']:6d} docs: {figures['peak_mb']:7.0f} MB"
              f"   ({figures['docs'] / figures['seconds']:.1f} docs/s)")


def demo() -> None:
    """curate + dedup of the ~26k wiki summaries (en/es/fr), workers=2, default recipes."""
    import tasks.curate as curate
    import tasks.dedup as dedup
    from storage.stage import StageContext

    base = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    try:
        docs = [d for lang in ("en", "es", "fr") for d in curatedata.wiki_documents(lang)]
        curatedata.write_documents(base / "in", docs)
        timings = {}
        for name, module, config, source in (
                ("curate", curate, curate.CurateConfig(executor={"workers": 2}), base / "in"),
                ("dedup", dedup, dedup.DedupConfig(exact={"enabled": True}, executor={"workers": 2}), base / "curate")):
            (base / name).mkdir()
            started = time.perf_counter()
            stats = module.run(config, StageContext(name, "demo", base / name, base / f"s-{name}",
                                                    {"documents": source}, base)).stats
            timings[name] = time.perf_counter() - started
            print(f"  {name}: {stats['docs_in']} -> {stats['docs_out']} documents in {timings[name]:.1f} s")
        print(f"demo: curate + dedup of {len(docs)} wiki summaries, workers=2: {sum(timings.values()):.1f} s "
              "(budget 180 s)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small input, URL filter off: under a minute")
    parser.add_argument("--demo", action="store_true", help="time curate + dedup on the 26k wiki summaries")
    parser.add_argument("--child", choices=["lmforge", "direct"], help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=TASKS, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.demo:
        return demo()
    copies = 1 if args.quick else 8
    base = Path(tempfile.mkdtemp(prefix="bench-curate-"))
    try:
        memory(base, copies, args.quick, throughput(base, copies, args.quick))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
