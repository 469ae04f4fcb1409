"""curate on real data: the two real WARC files and the wiki summaries, through datatrove's executors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datatrove.data import Document as DtDocument
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper module beside this file
import curatedata  # noqa: E402

import tasks.curate as curate  # noqa: E402
from storage.documents import DOCUMENT_SCHEMA, document_files, iter_documents  # noqa: E402
from storage.stage import StageContext, StageError  # noqa: E402
from tasks.docpipe.executors import build_executor, run_executor  # noqa: E402
from tasks.curate.filters import WARMUP_HTML, HtmlExtractor, QuietSandbox  # noqa: E402
from tasks.docpipe.funnel import Scratch  # noqa: E402
from tasks.curate.pipeline import build_steps  # noqa: E402
from tasks.docpipe.steps import FunnelFilter, HashSampler, read_problems  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TASKS, WORKERS = 4, 1
# the Common Crawl pages whose extracted text is English (read by hand; see benchmarks/langid.py)
CC_ENGLISH = ("http://037426.cn/",)


def make_ctx(root: Path, input_dir: Path, name: str) -> StageContext:
    (root / name / "out").mkdir(parents=True)
    return StageContext("curate", name, root / name / "out", root / name / "scratch", {"documents": input_dir}, root)


def output_docs(directory: Path) -> list:
    return sorted(iter_documents(directory), key=lambda d: d.id)


@pytest.fixture(scope="module")
def real_input(tmp_path_factory) -> Path:
    """Both real WARC files plus English and French wiki summaries, in small row groups (many units)."""
    docs = [*curatedata.real_warc_documents(), *curatedata.wiki_documents("en", 12), *curatedata.wiki_documents("fr", 4)]
    return curatedata.write_documents(tmp_path_factory.mktemp("real") / "documents", docs, row_group_rows=6)


@pytest.fixture(scope="module")
def curated(tmp_path_factory, real_input):
    """The default (FineWeb) recipe with excluded documents written, in-process, one worker."""
    root = tmp_path_factory.mktemp("curated")
    # The runs compared here get an extraction timeout no page comes near, so what they compare never
    # hangs on how close a page came to it.
    config = curate.CurateConfig(write_excluded=True, extract={"timeout_s": 30.0},
                                 executor={"tasks": TASKS, "workers": WORKERS})
    ctx = make_ctx(root, real_input, "reference")
    return config, ctx, curate.run(config, ctx)


# --- the real WARC files --------------------------------------------------------------------------

def test_extraction_keeps_real_text_of_english_warc_pages(curated):
    _, ctx, result = curated
    assert result.stats["funnel/02_extract/dolma_wget/in"] == 22
    assert result.stats["funnel/02_extract/dolma_wget/out"] >= 20, "Trafilatura kept (almost) nothing"
    kept = [d for d in output_docs(ctx.output) if d.source == "dolma_wget"]
    assert len(kept) >= 8
    for doc in kept:
        assert "<div" not in doc.text and "</p>" not in doc.text
        assert doc.metadata["content_type"] == "text/plain" and doc.metadata["extracted_from"] == "text/html"
    soldaini = next(d for d in kept if d.url == "https://soldaini.net/")
    assert "Luca Soldaini" in soldaini.text


def test_multilingual_common_crawl_loses_its_non_english_pages_at_the_language_step(curated):
    _, ctx, result = curated
    english_cc = sum(1 for d in curatedata.warc_documents(curatedata.CC_WARC, "cc") if d.url.startswith(CC_ENGLISH))
    assert result.stats["funnel/03_language/cc/in"] >= 14
    assert result.stats["funnel/03_language/cc/out"] <= english_cc
    assert result.stats["dropped/language/zh"] >= 8
    assert result.stats["dropped/language/ru"] == 1 and result.stats["dropped/language/nl"] == 1
    excluded = list(iter_documents(list((ctx.output / "excluded" / "language").glob("*.parquet"))))
    assert {d.metadata["filter_reason"] for d in excluded} >= {"zh", "ru", "de", "nl"}
    assert all(d.metadata["language"] != "en" for d in excluded if d.source == "cc")
    assert all(d.metadata["language"] == "en" and d.metadata["language_score"] >= 0.65
               for d in output_docs(ctx.output))


def test_french_wiki_summaries_are_dropped_as_french(curated):
    _, _, result = curated
    assert result.stats["by_source/wiki_fr/docs_in"] == 4
    assert result.stats["dropped/language/fr"] >= 4
    assert "funnel/03_language/wiki_fr/out" not in result.stats


def test_funnel_adds_up(curated, real_input):
    _, ctx, result = curated
    stats = result.stats
    dropped = sum(v for k, v in stats.items() if k.startswith("dropped/"))
    assert stats["docs_in"] == 38 + 12 + 4 == stats["docs_out"] + dropped
    assert stats["docs_out"] == len(output_docs(ctx.output)) > 0
    labels = result.artifacts["funnel_steps"]
    assert labels == ["01_url_filter", "02_extract", "03_language", "04_gopher_repetition", "05_gopher_quality",
                      "06_c4_quality", "07_fineweb_quality", "08_pii"]
    for source in ("cc", "dolma_wget", "wiki_en", "wiki_fr"):
        assert stats[f"funnel/01_url_filter/{source}/in"] == stats[f"by_source/{source}/docs_in"]
        for before, after in zip(labels, labels[1:]):  # what leaves a step enters the next
            assert stats.get(f"funnel/{before}/{source}/out", 0) == stats.get(f"funnel/{after}/{source}/in", 0)
        assert stats.get(f"funnel/08_pii/{source}/out", 0) == stats.get(f"by_source/{source}/docs_out", 0)
    for label in labels:  # each step's losses are exactly its counted drops
        name = label.split("_", 1)[1]
        lost = sum(stats.get(f"funnel/{label}/{s}/in", 0) - stats.get(f"funnel/{label}/{s}/out", 0)
                   for s in ("cc", "dolma_wget", "wiki_en", "wiki_fr"))
        assert lost == sum(v for k, v in stats.items() if k.startswith(f"dropped/{name}/"))


def test_output_is_the_document_schema_and_excluded_files_stay_out_of_it(curated):
    _, ctx, _ = curated
    files = document_files(ctx.output)
    assert files and all(p.parent == ctx.output for p in files)
    for path in files:
        assert pq.read_schema(path).remove_metadata().equals(DOCUMENT_SCHEMA)
    excluded = sorted((ctx.output / "excluded").rglob("*.parquet"))
    assert {p.parent.name for p in excluded} >= {"language", "gopher_quality"}
    for doc in iter_documents(excluded):
        assert doc.metadata["filter_reason"]


def test_rerun_with_two_workers_gives_identical_files(curated, real_input, tmp_path):
    """Same recipe and seed -> the same bytes, with `workers=2` (forkserver) from a plain process."""
    config, reference, reference_result = curated
    ctx = make_ctx(tmp_path, real_input, "two-workers")
    two = config.model_copy(update={"executor": config.executor.model_copy(update={"workers": 2})})
    assert two.output_fields() == config.output_fields()  # workers never change the fingerprint
    result = curate.run(two, ctx)
    assert _file_bytes(ctx.output) == _file_bytes(reference.output)
    assert {k: v for k, v in result.stats.items() if not k.startswith("time_s/")} == \
        {k: v for k, v in reference_result.stats.items() if not k.startswith("time_s/")}


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*.parquet"))}


# --- crashes and bad input ------------------------------------------------------------------------

KILLABLE_RUN = """
import sys
from pathlib import Path
import tasks.curate as curate
from storage.stage import StageContext
if __name__ == "__main__":
    config = curate.CurateConfig.model_validate_json(sys.argv[1])
    root, inputs = Path(sys.argv[2]), Path(sys.argv[3])
    curate.run(config, StageContext("curate", "killed", root / "out", root / "scratch", {"documents": inputs}, root))
"""


def test_a_killed_run_resumes_from_the_completion_markers(curated, real_input, tmp_path):
    config, reference, _ = curated
    ctx = make_ctx(tmp_path, real_input, "killed")
    completions = ctx.scratch / "logs" / "pipeline" / "completions"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE_RUN, config.model_dump_json(), str(tmp_path / "killed"),
                             str(real_input)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (completions.is_dir() and any(completions.iterdir())) and proc.poll() is None:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = sorted(p.name for p in completions.iterdir())
    assert 1 <= len(done_before) < TASKS, "the run must be killed between its first and its last task"
    stamps = {name: (ctx.scratch / "logs/pipeline/stats" / f"{name}.json").stat().st_mtime_ns for name in done_before}

    result = curate.run(config, ctx)  # same scratch: the resumed attempt
    for name, stamp in stamps.items():  # completed ranks were not run again
        assert (ctx.scratch / "logs/pipeline/stats" / f"{name}.json").stat().st_mtime_ns == stamp
    assert _file_bytes(ctx.output) == _file_bytes(reference.output)
    assert result.stats["docs_out"] == len(output_docs(reference.output))


# extraction only: every plain-text document passes, so what is lost can only be the reader's doing
LIGHT = {**{step: {"enabled": False} for step in ("url_filter", "language", "gopher_repetition", "gopher_quality",
                                                   "c4_quality", "fineweb_quality", "pii")}, "executor": {"tasks": 2}}


def test_corrupt_files_are_listed_and_everything_good_is_kept(tmp_path):
    docs = curatedata.wiki_documents("en", 10)
    inputs = curatedata.write_documents(tmp_path / "in", docs, row_group_rows=5)
    good = inputs / "wiki_en" / "part-00000.parquet"
    (inputs / "garbage.parquet").write_bytes(b"this is not parquet at all" * 100)
    (inputs / "truncated.parquet").write_bytes(good.read_bytes()[:-100])
    damaged = inputs / "damaged" / "part-00000.parquet"  # footer intact, first row group's pages overwritten
    damaged.parent.mkdir()
    curatedata.write_documents(tmp_path / "tmp", curatedata.wiki_documents("en", 10, start=10), row_group_rows=5)
    raw = bytearray((tmp_path / "tmp" / "wiki_en" / "part-00000.parquet").read_bytes())
    first_group = pq.ParquetFile(tmp_path / "tmp" / "wiki_en" / "part-00000.parquet").metadata.row_group(0)
    start = first_group.column(1).data_page_offset  # the text column's pages
    raw[start + 10: start + 400] = b"\xff" * 390
    damaged.write_bytes(bytes(raw))

    rows = [{"id": "odd/1", "text": "fine text", "source": "odd", "url": None, "metadata": "not json"},
            {"id": "odd/2", "text": "fine text too", "source": "odd", "url": None, "metadata": "{}"}]
    pq.write_table(pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA), inputs / "odd.parquet")

    ctx = make_ctx(tmp_path, inputs, "bad")
    result = curate.run(curate.CurateConfig(**LIGHT), ctx)
    reasons = {(Path(b["path"]).name, b["reason"]) for b in result.bad_inputs}
    assert ("garbage.parquet", "corrupt_parquet") in reasons and ("truncated.parquet", "corrupt_parquet") in reasons
    assert any(b["reason"] == "corrupt_parquet" and "row group 0" in (b.get("where") or "")
               for b in result.bad_inputs if b["path"].endswith("damaged/part-00000.parquet"))
    assert ("odd.parquet", "bad_metadata") in reasons
    assert result.stats["docs_in"] == 22 and result.stats["dropped/read/corrupt"] == 5
    assert result.stats["dropped/read/bad_metadata"] == 1
    kept = {d.id for d in iter_documents(ctx.output)}
    assert "odd/2" in kept and "odd/1" not in kept
    assert {d.id for d in docs} <= kept  # the good file lost nothing
    assert len(kept & {d.id for d in curatedata.wiki_documents("en", 10, start=10)}) == 5  # the intact row group


def test_an_input_without_documents_is_a_clear_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "junk.parquet").write_bytes(b"junk")
    with pytest.raises(StageError, match="no readable document Parquet.*junk.parquet"):
        curate.run(curate.CurateConfig(**LIGHT), make_ctx(tmp_path, tmp_path / "in", "empty"))


def test_an_input_with_zero_documents_gives_an_empty_output(tmp_path):
    """What a stage that kept nothing leaves (no file, or a file without rows) is read as empty, not an error."""
    (tmp_path / "none").mkdir()
    (tmp_path / "zero_rows").mkdir()
    pq.write_table(DOCUMENT_SCHEMA.empty_table(), tmp_path / "zero_rows" / "part-00000.parquet")
    for name in ("none", "zero_rows"):
        ctx = make_ctx(tmp_path, tmp_path / name, f"from-{name}")
        result = curate.run(curate.CurateConfig(**{**LIGHT, "extract": {"enabled": False}}), ctx)
        assert result.stats["docs_in"] == result.stats["docs_out"] == 0
        assert not any(k.startswith("dropped/") for k in result.stats) and not result.bad_inputs
        assert document_files(ctx.output) == []


def test_a_failing_rank_does_not_stop_the_others_and_is_named(tmp_path):
    scratch = Scratch(tmp_path / "scratch")
    pipeline = [_FailOnRank(1)]
    executor = build_executor(pipeline, curate.CurateConfig(**LIGHT).executor.model_copy(update={"tasks": 3}),
                              scratch.logging_dir())
    with pytest.raises(StageError, match=r"(?s)1 of 3 tasks failed.*rank 1: RuntimeError: rank one is broken"):
        run_executor(executor, curate.CurateConfig(**LIGHT).executor, "test")
    assert sorted(p.name for p in (scratch.logging_dir() / "completions").iterdir()) == ["00000", "00002"]


class _FailOnRank(HashSampler):
    """A step that raises on one rank (importable, so the executor can run it)."""

    def __init__(self, bad_rank: int) -> None:
        super().__init__(1.0, 0)
        self.bad_rank = bad_rank

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if rank == self.bad_rank:
            raise RuntimeError("rank one is broken")
        yield from ()


class _Fragile(HashSampler):
    """A filter that raises on one document, as a datatrove filter can on input it did not expect."""

    def filter(self, doc):
        if "boom" in doc.text:
            raise ZeroDivisionError("division by zero")
        return True


def test_a_document_that_makes_a_filter_raise_is_dropped_and_listed(tmp_path):
    step = FunnelFilter("09_fragile", _Fragile(1.0, 0), str(tmp_path / "problems"))
    docs = [DtDocument(text=t, id=t, metadata={"source": "s"}) for t in ("fine", "boom", "also fine")]
    assert [d.id for d in step.run(iter(docs), rank=3)] == ["fine", "also fine"]
    assert step.stats["dropped_error"].total == 1 and step.stats["in/s"].total == 3
    (problem,) = read_problems(tmp_path / "problems")
    assert problem["path"] == "boom" and problem["reason"] == "09_fragile_error"
    assert "ZeroDivisionError" in problem["detail"]


def test_a_hanging_document_is_cut_off_by_the_timeout_and_counted():
    page = next(d for d in curatedata.warc_documents(curatedata.DOLMA_WARC, "dolma_wget") if d.url == "https://soldaini.net/")
    huge = "<html><body>" + "".join(f"<div><p>Paragraph {i} says little, at length.</p></div>" for i in range(30000))
    extractor = HtmlExtractor(favour_precision=True, timeout=1.0)
    docs = [DtDocument(text=huge + "</body></html>", id="hangs", metadata={"content_type": "text/html"}),
            DtDocument(text=page.text, id="fine", metadata={"content_type": "text/html"}),
            DtDocument(text="plain words", id="plain", metadata={})]
    kept = [d.id for d in extractor.run(iter(docs))]
    assert kept == ["fine", "plain"]
    assert extractor.stats["dropped_timeout"].total == 1 and extractor.stats["passthrough"].total == 1



def test_the_extraction_timeout_counts_cpu_time_not_the_wait_of_a_loaded_machine():
    """A sandbox held off the CPU for 1.5 s (as a loaded machine does) still extracts within a 1 s timeout;
    one that never answers is cut off after `hang_after_s` of wall time."""
    page = next(d for d in curatedata.warc_documents(curatedata.DOLMA_WARC, "dolma_wget") if d.url == "https://soldaini.net/")
    extractor = HtmlExtractor(favour_precision=True, timeout=1.0)
    with QuietSandbox(timeout=1.0, warmup_text=WARMUP_HTML, hang_after_s=4.0) as sandbox:
        assert "Luca Soldaini" in sandbox.process_document(page.text, extractor.extract)
        os.kill(sandbox.process.pid, signal.SIGSTOP)
        resume = threading.Timer(1.5, os.kill, (sandbox.process.pid, signal.SIGCONT))
        resume.start()
        started = time.monotonic()
        assert "Luca Soldaini" in sandbox.process_document(page.text, extractor.extract)
        assert time.monotonic() - started >= 1.4
        resume.join()
        os.kill(sandbox.process.pid, signal.SIGSTOP)                 # never resumed: a hang
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            sandbox.process_document(page.text, extractor.extract)
        assert 3.9 <= time.monotonic() - started < 8

# --- each filter's thresholds, on crafted boundary documents --------------------------------------

def steps_of(**overrides) -> dict:
    """The enabled steps of a recipe, by name, each with its funnel wrapper (as the executor runs them)."""
    config = curate.CurateConfig(**overrides)
    return {label.split("_", 1)[1]: step for label, step in build_steps(config, 0, Scratch(Path("/nonexistent")))}


def verdict(step, text: str, **metadata) -> object:
    result = step.filter(DtDocument(text=text, id="crafted", metadata={"source": "crafted", **metadata}))
    return True if result is True else result[1]


def words(n: int, word: str = "word") -> str:
    return " ".join(["the", "and"] + [word] * (n - 2))


def test_gopher_quality_word_count_boundary():
    step = steps_of()["gopher_quality"]
    assert verdict(step, words(50)) is True
    assert verdict(step, words(49)) == "gopher_short_doc"
    assert verdict(steps_of(gopher_quality={"min_doc_words": 10})["gopher_quality"], words(20)) is True


def test_gopher_quality_word_length_stop_words_bullets_ellipsis_boundaries():
    step = steps_of(gopher_quality={"min_stop_words": 0})["gopher_quality"]
    assert verdict(step, " ".join(["abcdefghij"] * 60)) is True                     # mean length 10.0
    assert verdict(step, " ".join(["abcdefghij"] * 59 + ["abcdefghijk"])) == "gopher_above_avg_threshold"
    stop = steps_of()["gopher_quality"]
    assert verdict(stop, " ".join(["the", "and"] + ["words"] * 60)) is True          # 2 stop words
    assert verdict(stop, " ".join(["the", "the"] + ["words"] * 60)) == "gopher_enough_stop_words"
    line = "the and some words in one line here"
    assert verdict(stop, "\n".join([f"- {line}"] * 18 + [line] * 2)) is True          # 90% bullets
    assert verdict(stop, "\n".join([f"- {line}"] * 19 + [line])) == "gopher_too_many_bullets"
    assert verdict(stop, "\n".join([f"{line} ..."] * 3 + [line] * 7)) is True         # 30% ellipsis lines
    assert verdict(stop, "\n".join([f"{line} ..."] * 4 + [line] * 6)) == "gopher_too_many_end_ellipsis"


def test_gopher_repetition_duplicate_lines_and_top_ngram():
    no_ngrams = {"top_n_grams": {}, "dup_n_grams": {}, "dup_line_char_frac": 0, "dup_para_char_frac": 0}
    step = steps_of(gopher_repetition=no_ngrams)["gopher_repetition"]
    distinct = [f"line {i} is about topic number {i}" for i in range(7)]
    assert verdict(step, "\n".join(distinct + ["same line"] * 3)) is True          # 2 duplicates of 10 lines
    assert verdict(step, "\n".join(distinct[:6] + ["same line"] * 4)) is True       # 3 of 10: 0.3, not above
    assert verdict(step, "\n".join(distinct[:5] + ["same line"] * 5)) == "dup_line_frac"
    repetitive = "buy now " * 40 + "some other words to close the text"
    assert verdict(steps_of()["gopher_repetition"], repetitive) == "top_2_gram"
    assert verdict(steps_of(gopher_repetition={**no_ngrams, "dup_para_frac": 0, "dup_line_frac": 0})
                   ["gopher_repetition"], repetitive) is True


def test_c4_quality_sentences_punctuation_and_curly_brackets():
    step = steps_of()["c4_quality"]
    five = "\n".join(f"This is sentence number {i} of the text." for i in range(5))
    assert verdict(step, five) is True
    assert verdict(step, "\n".join(five.splitlines()[:4])) == "too_few_sentences"
    unpunctuated = "\n".join(f"This is sentence number {i} without an end" for i in range(5))
    assert verdict(step, unpunctuated) is True  # FineWeb keeps lines without terminal punctuation
    strict = steps_of(c4_quality={"filter_no_terminal_punct": True})["c4_quality"]
    assert verdict(strict, unpunctuated) == "too_few_sentences"
    assert verdict(step, five + "\nThe code is {x = 1} here.") == "curly_bracket"
    assert verdict(step, five + "\nLorem ipsum dolor sit amet.") == "lorem_ipsum"


def test_fineweb_quality_ratios():
    step = steps_of()["fineweb_quality"]
    long_lines = [f"this long line number {i} has enough words in it" for i in range(100)]
    punctuated = lambda k: [line + "." for line in long_lines[:k]] + long_lines[k:]  # noqa: E731
    assert verdict(step, "\n".join(punctuated(12))) is True                      # 0.12 punctuated
    assert verdict(step, "\n".join(punctuated(11))) == "line_punct_ratio"
    short = [f"Short line {i} ok." for i in range(100)]
    assert verdict(step, "\n".join(short[:67] + [line + "." for line in long_lines[:33]])) is True   # 0.67 short
    assert verdict(step, "\n".join(short[:68] + [line + "." for line in long_lines[:32]])) == "short_line_ratio"
    dup = [line + "." for line in long_lines]
    assert verdict(step, "\n".join(dup + dup[:5])) == "char_dup_ratio"
    one_word_lines = [f"Antidisestablishmentarianism{i:04d}." for i in range(40)]  # long, punctuated, 1 word
    assert verdict(step, "\n".join(one_word_lines)) == "list_ratio"


def test_language_threshold_boundary_and_reasons():
    text = "The committee published its annual report on the state of the regional railway network."
    lang, score = steps_of()["language"].inner.backend.predict(text)
    assert lang == "en"
    assert verdict(steps_of(language={"threshold": score})["language"], text) is True
    assert verdict(steps_of(language={"threshold": min(1.0, score + 0.01)})["language"], text) == "below_threshold"
    french = "Le comité a publié son rapport annuel sur l'état du réseau ferroviaire régional et ses gares."
    assert verdict(steps_of()["language"], french) == "fr"
    assert verdict(steps_of(language={"languages": ["en", "fr"]})["language"], french) is True


def test_quality_filters_tokenize_the_kept_language_or_fail_before_running():
    # CLD2 reports Traditional Chinese as zh-Hant: every document used to be dropped as `error` by the
    # quality filters, whose word tokenizer knows no 'zh-Hant'
    chinese = "這是一個關於城市鐵路網絡的報告。" * 40
    steps = steps_of(language={"languages": ["zh-Hant"]})
    assert all(verdict(steps[name], chinese) != "error" for name in ("gopher_repetition", "gopher_quality",
                                                                      "fineweb_quality"))
    with pytest.raises(StageError, match=r"language.languages=\['zz'\]: .* 'zz' doesn't have a tokenizer"):
        steps_of(language={"languages": ["zz"]})   # every document was an `error` drop
    from datatrove.utils.word_tokenizers import load_word_tokenizer
    try:
        load_word_tokenizer("ko")
    except ImportError:   # not installed here: the recipe fails when its steps are built, not inside every rank
        with pytest.raises(StageError, match=r"language.languages=\['ko'\]: the quality filters' word tokenizer"):
            steps_of(language={"languages": ["ko"]})
    else:
        pytest.skip("a Korean word tokenizer is installed")


def test_url_filter_offline_lists_extra_domains_and_plain_text():
    step = steps_of(url_filter={"extra_domains": ["blocked-example.org"]})["url_filter"]
    assert verdict(step, "text", url="https://blocked-example.org/page") == "domain"
    assert verdict(step, "text", url="https://example.com/2g1c/video") == "hard_blacklisted"  # bundled word list
    assert verdict(step, "text", url="https://example.com/research/") is True
    assert verdict(step, "a plain-text document without a URL") is True


def test_pii_replaces_emails_and_public_ips_only():
    step = steps_of()["pii"]
    doc = DtDocument(text="Mail jane.doe@gmail.com from 8.8.8.8, not 192.168.0.1.", id="p", metadata={"source": "s"})
    (out,) = list(step.run(iter([doc])))
    assert "jane.doe@gmail.com" not in out.text and "@example." in out.text
    assert "8.8.8.8" not in out.text and "192.168.0.1" in out.text


def test_sampling_is_seeded_and_order_independent():
    ids = [f"doc-{i}" for i in range(400)]
    keep = lambda seed, order: {i for i in order if HashSampler(0.25, seed).filter(DtDocument("t", i)) is True}  # noqa: E731
    assert keep(7, ids) == keep(7, ids[::-1])
    assert 70 <= len(keep(7, ids)) <= 130 and keep(7, ids) != keep(8, ids)


def test_ingest_then_curate_sampling_at_half_keep_a_quarter(tmp_path):
    """Two samples of one pipeline (same seed) draw independently: 0.5 after 0.5 keeps 25%, not 50%."""
    from tasks.ingest import IngestConfig
    from tasks.ingest import run as run_ingest

    lines = "".join(json.dumps({"id": i, "text": f"document number {i}"}) + "\n" for i in range(10_000))
    (tmp_path / "docs.jsonl").write_text(lines)
    ingest_config = IngestConfig.model_validate({"sources": [
        {"name": "s", "kind": "jsonl", "paths": [str(tmp_path / "docs.jsonl")], "sample_rate": 0.5}]})
    ingested = StageContext("ingest", "i", tmp_path / "ingested", tmp_path / "i-scratch", {}, tmp_path, 1337)
    ingest_stats = run_ingest(ingest_config, ingested).stats
    assert abs(ingest_stats["docs_out"] - 5000) < 300
    ctx = make_ctx(tmp_path, ingested.output, "curated")
    ctx = StageContext(**{**ctx.__dict__, "seed": 1337})
    config = curate.CurateConfig(**{**LIGHT, "extract": {"enabled": False}, "executor": {"tasks": 1}}, sample_rate=0.5)
    stats = curate.run(config, ctx).stats
    assert 2200 <= stats["docs_out"] == len(output_docs(ctx.output)) <= 2800   # 25% +- 3% of 10,000
    assert stats["dropped/sample/not_sampled"] == ingest_stats["docs_out"] - stats["docs_out"]


# --- the recipe ------------------------------------------------------------------------------------

def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValidationError, match="gopher_quality.max_doc_word"):
        curate.CurateConfig(gopher_quality={"max_doc_word": 5})
    with pytest.raises(ValidationError, match="language.threshold"):
        curate.CurateConfig(language={"threshold": 1.5})
    with pytest.raises(ValidationError, match="model_path"):
        curate.CurateConfig(language={"backend": "fasttext"})
    with pytest.raises(ValidationError, match="executor.slurm.partition is required"):
        curate.CurateConfig(executor={"kind": "slurm"})
    for wrong in (["EN"], ["en", "English"], ["en_US"]):   # accepted before, then every document was dropped
        with pytest.raises(ValidationError, match=r"language.languages\n.*not language codes as the backends report"):
            curate.CurateConfig(language={"languages": wrong})
    assert curate.CurateConfig(language={"languages": ["en", "zh-Hant", "ceb"]}).language.languages[1] == "zh-Hant"


def test_fasttext_without_its_model_file_fails_before_running(tmp_path):
    config = curate.CurateConfig(language={"backend": "fasttext", "model_path": tmp_path / "lid.176.bin"})
    with pytest.raises(StageError, match="no fastText model at .*lid.176.bin"):
        steps_of(**config.model_dump())


def test_library_versions_and_a_local_fasttext_model_join_the_fingerprint(tmp_path):
    assert curate.external_inputs(curate.CurateConfig())["libraries"]["pycld2"] == version("pycld2")
    model = tmp_path / "lid.176.bin"
    model.write_bytes(b"stand-in bytes: only the file's size and time are read here")
    config = curate.CurateConfig(language={"backend": "fasttext", "model_path": model})
    assert curate.external_inputs(config)["language_model"][:2] == [str(model), model.stat().st_size]


def test_only_tasks_of_the_executor_changes_the_fingerprint_fields():
    base = curate.CurateConfig().output_fields()
    other_place = curate.CurateConfig(executor={"kind": "slurm", "workers": 8, "slurm": {"partition": "cpu"}})
    assert other_place.output_fields() == base
    assert curate.CurateConfig(executor={"tasks": 16}).output_fields() != base


def test_knobs_that_cannot_act_stay_out_of_the_fingerprint():
    """A grid that switches a step off, or varies the language backend, under one base recipe."""
    base = curate.CurateConfig()
    off = curate.CurateConfig(gopher_quality={"enabled": False})
    assert curate.CurateConfig(gopher_quality={"enabled": False, "min_doc_words": 5}).output_fields() == \
        off.output_fields() != base.output_fields()
    assert curate.CurateConfig(gopher_quality={"min_doc_words": 5}).output_fields() != base.output_fields()
    language_off = curate.CurateConfig(language={"enabled": False})
    idle = curate.CurateConfig(language={"enabled": False, "backend": "langid", "threshold": 0.2})
    assert idle.output_fields() == language_off.output_fields()
    assert "langid" not in curate.external_inputs(idle)["libraries"]
    # with the step off, the quality filters still take their word tokenizer from `languages`
    french = curate.CurateConfig(language={"enabled": False, "languages": ["fr"]})
    assert french.output_fields() != language_off.output_fields()
    assert curate.CurateConfig(language={"model_path": "lid.176.bin"}).output_fields() == base.output_fields()


def test_slurm_executor_is_built_with_the_recipe_options(tmp_path):
    config = curate.CurateConfig(executor={"kind": "slurm", "tasks": 6, "workers": 2, "slurm": {
        "partition": "cpu", "time": "02:00:00", "cpus_per_task": 4, "mem_per_cpu_gb": 3,
        "sbatch_args": {"account": "ablations"}}}).executor
    executor = build_executor([HashSampler(1.0, 0)], config, tmp_path / "logs", job_name="curate")
    args = executor.get_sbatch_args(max_array=6)
    assert (args["partition"], args["time"], args["cpus-per-task"], args["mem-per-cpu"]) == ("cpu", "02:00:00", 4, "3G")
    assert args["array"] == "0-5%2" and args["account"] == "ablations" and executor.world_size == 6
    script = executor.get_launch_file_contents(args, "launch_pickled_pipeline executor.pik")
    assert "#SBATCH --partition=cpu" in script and "#SBATCH --job-name=lmforge-curate" in script
    if not any((Path(p) / "sbatch").exists() for p in os.environ.get("PATH", "").split(os.pathsep)):
        with pytest.raises(StageError, match="sbatch"):
            run_executor(executor, config, "curate")


def test_ray_executor_needs_ray_installed_or_is_built(tmp_path):
    from importlib.util import find_spec

    config = curate.CurateConfig(executor={"kind": "ray", "tasks": 3, "ray": {"cpus_per_task": 2}}).executor
    # find_spec, not `import ray`: Ray reads its settings on import, and tests/team/test_ray.py sets them first
    if find_spec("ray") is None:
        with pytest.raises(StageError, match="ray package is not installed"):
            build_executor([HashSampler(1.0, 0)], config, tmp_path / "logs")
    else:
        executor = build_executor([HashSampler(1.0, 0)], config, tmp_path / "logs")
        assert executor.world_size == 3 and executor.cpus_per_task == 2


# --- inside Prefect ---------------------------------------------------------------------------------

def test_two_workers_from_a_prefect_task(prefect_api, curated, real_input, tmp_path):
    """datatrove's forkserver pool started from inside a Prefect task run gives the same output."""
    from prefect import flow, task

    config, reference, _ = curated
    two = config.model_copy(update={"executor": config.executor.model_copy(update={"workers": 2})})

    @task
    def curate_task(root: str) -> dict:
        return curate.run(two, make_ctx(Path(root), real_input, "prefect")).stats

    @flow
    def curate_flow(root: str) -> dict:
        return curate_task(root)

    stats = curate_flow(str(tmp_path))
    assert stats["docs_out"] == len(output_docs(reference.output)) > 0
    assert _file_bytes(tmp_path / "prefect" / "out") == _file_bytes(reference.output)


def test_a_missing_language_backend_fails_when_the_step_is_built(monkeypatch):
    """Not on every document: a missing package must not silently drop the whole corpus."""
    from storage.stage import StageError
    from tasks.curate import langid

    monkeypatch.setitem(langid.BACKEND_MODULES, "pycld2", "no_such_language_package")
    with pytest.raises(StageError, match="language.backend='pycld2' needs the Python package 'no_such_language_package'"):
        langid.make_backend("pycld2")
