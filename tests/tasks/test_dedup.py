"""dedup on real documents: MinHash near-duplicates, exact duplicates, decontamination against real eval sets."""
from __future__ import annotations

import csv
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper module beside this file
import curatedata  # noqa: E402

import tasks.dedup as dedup  # noqa: E402
from storage.documents import Document, iter_documents  # noqa: E402
from storage.stage import StageContext, StageError  # noqa: E402
from tasks.datasets import read_glue, read_squad  # noqa: E402
from tasks.datasets.multiple_choice import ChoiceItem, hellaswag_clean, read_choice_file  # noqa: E402
from tasks.dedup.evalsets import eval_set_name, eval_texts  # noqa: E402

GLUE = curatedata.SHARED_DATA / "glue"
SQUAD = curatedata.SHARED_DATA / "squad"
SST2 = GLUE / "sst2" / "dev.tsv"
EVAL_SETS = [curatedata.SQUAD_SUBSET, SST2]


def make_ctx(root: Path, input_dir: Path, name: str) -> StageContext:
    (root / name / "out").mkdir(parents=True)
    return StageContext("dedup", name, root / name / "out", root / name / "scratch", {"documents": input_dir}, root)


def near_copy(doc: Document, share: float = 0.03) -> Document:
    """`doc` with `share` of its words replaced, in three runs (edits cluster in real near-duplicates)."""
    words = doc.text.split()
    per_run = max(1, round(len(words) * share / 3))
    for start in (len(words) // 5, len(words) // 2, 4 * len(words) // 5):
        for i in range(start, start + per_run):
            words[i] = f"changed{i}"
    return replace(doc, id="near-copy", source="mirror", text=" ".join(words))


def sst2_sentence() -> str:
    """A long SST-2 dev sentence (an evaluation example a web page might quote)."""
    with open(SST2, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return max((row["text"] for row in rows), key=lambda t: len(t.split()))


@pytest.fixture(scope="module")
def corpus() -> dict[str, Document]:
    """30 long real wiki summaries, a near copy, a reformatted exact copy, and two contaminated pages."""
    long_docs = [d for d in curatedata.wiki_documents("en", 400) if len(d.text.split()) >= 120][:30]
    original, exact_source = long_docs[0], long_docs[1]
    exact = replace(exact_source, id="exact-copy", source="mirror",
                    text=exact_source.text.upper().replace(",", " ,").replace(". ", ".\n"))
    squad = Document("web/squad-quote", "A page that quotes a reading passage. " + curatedata.squad_contexts()[0]
                     + " That was the passage.", "web", "https://example.org/squad", {})
    glue = Document("web/sst2-quote", "Our film review blog, in short: " + sst2_sentence(), "web", None, {})
    return {d.id: d for d in [*long_docs, near_copy(original), exact, squad, glue]}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, corpus) -> Path:
    return curatedata.write_documents(tmp_path_factory.mktemp("corpus") / "documents", corpus.values(),
                                      row_group_rows=8)


FULL = {"exact": {"enabled": True}, "decontaminate": {"enabled": True, "eval_sets": EVAL_SETS},
        "executor": {"tasks": 2}}


@pytest.fixture(scope="module")
def deduped(tmp_path_factory, corpus_dir):
    ctx = make_ctx(tmp_path_factory.mktemp("deduped"), corpus_dir, "full")
    return ctx, dedup.run(dedup.DedupConfig(**FULL), ctx)


def kept_ids(ctx: StageContext) -> set[str]:
    return {d.id for d in iter_documents(ctx.output)}


def test_near_copy_collapses_and_different_real_documents_survive(deduped, corpus):
    ctx, result = deduped
    ids = list(corpus)
    original, exact_source = ids[0], ids[1]
    kept = kept_ids(ctx)
    assert len(kept & {original, "near-copy"}) == 1
    assert set(ids[2:30]) <= kept  # 28 different real documents all survive
    assert len(kept & {exact_source, "exact-copy"}) == 1
    assert result.stats["dropped/minhash/duplicate"] == 1 and result.stats["minhash/clusters"] == 1
    assert result.stats["dropped/exact/duplicate"] == 1


def test_near_copy_really_is_three_percent_different(corpus):
    original, near = corpus[next(iter(corpus))].text.split(), corpus["near-copy"].text.split()
    changed = sum(a != b for a, b in zip(original, near))
    assert len(original) == len(near) and 0.02 <= changed / len(original) <= 0.04


def test_decontamination_drops_pages_quoting_squad_and_glue(deduped):
    ctx, result = deduped
    assert not kept_ids(ctx) & {"web/squad-quote", "web/sst2-quote"}
    assert result.stats["dropped/decontaminate/squad-dev-v2.0-subset"] == 1
    assert result.stats["dropped/decontaminate/sst2-dev"] == 1
    assert result.stats["decontaminate/squad-dev-v2.0-subset/ngrams"] > 1000


def test_dedup_funnel_adds_up(deduped, corpus):
    ctx, result = deduped
    stats = result.stats
    dropped = sum(v for k, v in stats.items() if k.startswith("dropped/"))
    assert stats["docs_in"] == len(corpus) == stats["docs_out"] + dropped
    assert stats["docs_out"] == len(kept_ids(ctx)) == len(corpus) - 4
    assert result.artifacts["funnel_steps"] == ["01_exact", "02_minhash", "03_decontaminate"]
    for source in ("wiki_en", "mirror", "web"):
        assert stats[f"funnel/01_exact/{source}/in"] == stats[f"by_source/{source}/docs_in"]
        assert stats.get(f"funnel/01_exact/{source}/out", 0) == stats.get(f"funnel/02_minhash/{source}/in", 0)
        assert stats.get(f"funnel/03_decontaminate/{source}/out", 0) == stats.get(f"by_source/{source}/docs_out", 0)


def test_same_recipe_gives_the_same_bytes(deduped, corpus_dir, tmp_path):
    reference, _ = deduped
    ctx = make_ctx(tmp_path, corpus_dir, "again")
    dedup.run(dedup.DedupConfig(**FULL), ctx)
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.rglob("*.parquet"))}  # noqa: E731
    assert files(ctx.output) == files(reference.output) != {}


def test_a_rerun_after_a_crash_redoes_only_the_unfinished_ranks(deduped, corpus_dir, tmp_path):
    """A crash during the filter pass: signatures, buckets and clusters are kept, one filter rank is redone."""
    reference, _ = deduped
    first = make_ctx(tmp_path, corpus_dir, "first")
    dedup.run(dedup.DedupConfig(**FULL), first)
    logs = first.scratch / "logs"
    (logs / "filter" / "completions" / "00001").unlink()  # as if the process died while rank 1 filtered
    for path in (first.scratch / "output").glob("*-00001.parquet"):
        path.unlink()  # (unlink first: the committed output of the first run hard-links this file)
        path.write_bytes(b"half-written")
    stamps = {p: p.stat().st_mtime_ns for p in logs.glob("*/stats/*.json") if "filter/stats/00001" not in str(p)}

    retry = StageContext("dedup", "first", tmp_path / "retry-out", first.scratch, first.inputs, tmp_path)
    retry.output.mkdir()
    dedup.run(dedup.DedupConfig(**FULL), retry)
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())  # nothing finished was redone
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.rglob("*.parquet"))}  # noqa: E731
    assert files(retry.output) == files(reference.output)


def test_flag_mode_keeps_contaminated_documents_and_marks_them(corpus_dir, tmp_path):
    config = dedup.DedupConfig(minhash={"enabled": False},
                               decontaminate={"enabled": True, "eval_sets": EVAL_SETS, "mode": "flag"})
    ctx = make_ctx(tmp_path, corpus_dir, "flag")
    result = dedup.run(config, ctx)
    flagged = {d.id: d.metadata for d in iter_documents(ctx.output) if "contaminated_task" in d.metadata}
    assert set(flagged) == {"web/squad-quote", "web/sst2-quote"}
    assert flagged["web/squad-quote"]["contaminated_task"] == "squad-dev-v2.0-subset"
    assert result.stats["flagged/decontaminate/sst2-dev"] == 1
    assert result.stats["docs_out"] == result.stats["docs_in"]
    assert not any(k.startswith("dropped/") for k in result.stats)


# --- evaluation sets --------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(GLUE.rglob("*.tsv")) + sorted(SQUAD.rglob("*.json")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_real_glue_and_squad_file_yields_its_texts(path):
    """Every file in the folders (they grow) gives the distinct texts of the examples the shared loaders read."""
    examples = read_glue(path) if path.suffix == ".tsv" else read_squad(path)
    expected = {text for example in examples for text in example.texts() if text.strip()}
    texts = eval_texts(path)
    assert texts and len(texts) == len(set(texts)) and set(texts) == expected


def test_known_eval_text_counts():
    """Distinct texts, counted with `cut | sort -u` on the files (CoLA: column 4; RTE, MRPC: the two sentences)."""
    assert len(eval_texts(GLUE / "cola" / "dev.tsv")) == 1039        # 1043 rows, 4 repeated sentences
    assert len(eval_texts(GLUE / "rte" / "dev.tsv")) == 539
    assert len(eval_texts(GLUE / "mrpc" / "dev.tsv")) == 807
    assert len(eval_texts(GLUE / "mrpc" / "hf_fixture_dev.tsv")) == 12   # header with a BOM, '#1 String' columns
    assert len(eval_texts(SST2)) == 872
    nested, flat = eval_texts(SQUAD / "dev-v2.0-subset.json"), eval_texts(SQUAD / "sample-flat.json")
    assert curatedata.squad_contexts()[0] in nested
    assert any("Normandy" in t for t in flat)
    assert eval_set_name(SQUAD / "dev-v2.0-tiny.json") == "squad-dev-v2.0-tiny"


def test_unreadable_eval_sets_are_clear_errors(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "dev.tsv").write_text("id\tlabel\n1\t0\n")
    with pytest.raises(StageError, match=r"eval_sets: .*sst2/dev.tsv:1: no sst2 text column in header \['id', 'label'\]"):
        eval_texts(tmp_path / "sst2" / "dev.tsv")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    with pytest.raises(StageError, match=r"eval_sets: .*dev.tsv: its folder name .* is not a GLUE task"):
        eval_texts(tmp_path / "dev.tsv")
    with pytest.raises(StageError, match="file not found"):
        eval_texts(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(StageError, match="broken.json: not valid JSON"):
        eval_texts(tmp_path / "broken.json")


def test_the_eval_files_content_is_part_of_the_fingerprint(tmp_path):
    copy = tmp_path / "sst2" / "dev.tsv"
    copy.parent.mkdir()
    shutil.copy(SST2, copy)
    config = dedup.DedupConfig(decontaminate={"enabled": True, "eval_sets": [copy]})
    before = dedup.external_inputs(config)
    copy.write_text(copy.read_text() + "one more sentence\t1\n")
    assert dedup.external_inputs(config) != before
    assert "eval_sets" not in dedup.external_inputs(dedup.DedupConfig())


def test_dedup_config_validation_and_fingerprint_fields():
    with pytest.raises(ValidationError, match="eval_sets must list at least one file"):
        dedup.DedupConfig(decontaminate={"enabled": True})
    with pytest.raises(ValidationError, match="minhash.hash_fc"):
        dedup.DedupConfig(minhash={"hash_fc": "md5"})
    base = dedup.DedupConfig().output_fields()
    assert base["minhash"] == {"enabled": True, "n_grams": 5, "num_buckets": 14, "hashes_per_bucket": 8,
                               "hash_fc": "sha1", "precision": 64, "seed": 1, "language": "en"}
    assert dedup.DedupConfig(executor={"workers": 2}).output_fields() == base
    assert dedup.DedupConfig(minhash={"num_buckets": 20}).output_fields() != base


def test_zero_documents_give_an_empty_output(tmp_path):
    """An upstream stage that kept nothing: every pass runs on nothing and the output is empty, not an error."""
    (tmp_path / "none").mkdir()
    ctx = make_ctx(tmp_path, tmp_path / "none", "empty")
    result = dedup.run(dedup.DedupConfig(**FULL), ctx)
    assert result.stats["docs_in"] == result.stats["docs_out"] == result.stats["minhash/clusters"] == 0
    assert not any(k.startswith("dropped/") for k in result.stats) and not result.bad_inputs
    assert list(ctx.output.rglob("*.parquet")) == []


# --- multiple-choice eval sets (the evaluate stage's files) ------------------------------------------

MULTIPLE_CHOICE = curatedata.SHARED_DATA / "multiple_choice"


@pytest.mark.parametrize("path", sorted(MULTIPLE_CHOICE.rglob("*.jsonl")) + sorted(MULTIPLE_CHOICE.rglob("*.json")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_real_multiple_choice_file_yields_its_raw_texts(path):
    texts = eval_texts(path)
    assert texts and len(texts) == len(set(texts)) and not any("Question:" in t for t in texts[:50])


def test_multiple_choice_texts_are_the_question_alone_and_with_each_choice():
    arc = eval_texts(MULTIPLE_CHOICE / "arc_easy" / "ARC-Easy-Dev.jsonl")
    assert arc[:3] == ["Which technology was developed most recently?",
                       "Which technology was developed most recently? cellular telephone",
                       "Which technology was developed most recently? television"]
    piqa = eval_texts(MULTIPLE_CHOICE / "piqa" / "valid.jsonl")     # no labels file needed: both solutions
    assert piqa[0] == "How do I ready a guinea pig cage for it's new occupants?" and len(piqa) > 2 * 1838
    wino = eval_texts(MULTIPLE_CHOICE / "winogrande" / "dev.jsonl")
    assert wino[:2] == ["Sarah was a much better surgeon than Maria so Sarah always got the easier cases.",
                        "Sarah was a much better surgeon than Maria so Maria always got the easier cases."]


def test_a_jsonl_that_is_no_multiple_choice_layout_is_a_clear_error(tmp_path):
    (tmp_path / "odd.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    with pytest.raises(StageError, match=r"odd.jsonl:1: not a multiple-choice layout .* found fields completion, prompt\)"):
        eval_texts(tmp_path / "odd.jsonl")
    (tmp_path / "arc.jsonl").write_text('{"question": {"stem": "q", "choices": []}, "answerKey": "A"}\n'
                                        '{"question": "flat", "answerKey": "A"}\n')
    with pytest.raises(StageError, match=r"arc.jsonl:2: not a arc row"):
        eval_texts(tmp_path / "arc.jsonl")


HELLASWAG_ROWS = [   # the released hellaswag_val.jsonl layout: `ctx` is ctx_a and ctx_b joined; WikiHow's brackets
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                 "starts pulling up roofing on a roof."]},
    {"ind": 1000, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow tomatoes [title] Pick a spot.",
     "ctx_b": "", "ctx": "[header] How to grow tomatoes [title] Pick a spot.", "label": 1,
     "endings": ["[step] Water daily.", "Choose a sunny place [substeps] with  shade."]},
]


def choice_files(tmp_path: Path) -> list[tuple[str, Path, Path | None]]:
    """(format, file, labels file): every real multiple-choice file, SWAG's rows also as the released val.csv
    and as a JSON array, and HellaSwag rows in the released layout."""
    swag_rows = [json.loads(line) for line in (MULTIPLE_CHOICE / "swag-sample.json").read_text().splitlines()]
    with open(tmp_path / "val.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "video-id", "fold-ind", "startphrase", "sent1", "sent2", "gold-source",
                         "ending0", "ending1", "ending2", "ending3", "label"])
        for index, row in enumerate(swag_rows):
            writer.writerow([index, "anetv_x", index, f"{row['sent1']} {row['sent2']}", row["sent1"], row["sent2"],
                             "gold", *(row[f"ending{i}"] for i in range(4)), row["label"]])
    (tmp_path / "swag" / "array.json").parent.mkdir()
    (tmp_path / "swag" / "array.json").write_text(json.dumps(swag_rows, indent=1))
    (tmp_path / "hellaswag_val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in HELLASWAG_ROWS))
    mc = MULTIPLE_CHOICE
    return [("arc", mc / "arc_easy" / "ARC-Easy-Dev.jsonl", None),
            ("arc", mc / "arc_challenge" / "ARC-Challenge-Dev.jsonl", None),
            ("piqa", mc / "piqa" / "valid.jsonl", mc / "piqa" / "valid-labels.lst"),
            ("winogrande", mc / "winogrande" / "dev.jsonl", None),
            ("lambada", mc / "lambada" / "lambada_test.jsonl", None),
            ("swag", mc / "swag-sample.json", None), ("swag", tmp_path / "val.csv", None),
            ("swag", tmp_path / "swag" / "array.json", None), ("hellaswag", tmp_path / "hellaswag_val.jsonl", None)]


def scored_texts(format: str, item: ChoiceItem) -> set[str]:
    """What a page quoting an item as the evaluate reader scores it contains: the context alone and followed by
    each choice, the harness's rendering undone (WinoGrande, HellaSwag: compared without spaces, and HellaSwag
    cleaned and lower-cased, as the harness rewrites them)."""
    if format == "lambada":
        return {item.contexts[0] + item.continuations[0]}
    if format == "winogrande":
        return {squeeze(context + rest) for context, rest in zip(item.contexts, item.continuations)}
    context = item.contexts[0].removeprefix("Question: ").removesuffix("\nAnswer:")
    if format == "hellaswag":
        context = context.split(": ", 1)[1]                  # the harness's "{activity_label}: " prefix
        return {squeeze(context, True), *(squeeze(context + choice, True) for choice in item.choices)}
    return {context, *(f"{context} {choice}".strip() for choice in item.choices)}


def squeeze(text: str, hellaswag: bool = False) -> str:
    return "".join((hellaswag_clean(text).lower() if hellaswag else text).split())


def test_decontamination_reads_exactly_the_texts_the_evaluate_readers_score(tmp_path):
    """One place knows the layouts: for every format and layout variant the evaluate stage reads, the texts
    decontamination indexes are the items' contexts and choices, no more, no fewer."""
    for format, path, labels in choice_files(tmp_path):
        items = read_choice_file(format, path, labels).items
        texts = eval_texts(path)
        expected = set().union(*(scored_texts(format, item) for item in items))
        if format in ("winogrande", "hellaswag"):
            assert {squeeze(text, format == "hellaswag") for text in texts} == expected, path
        else:
            assert set(texts) == expected, path


def test_decontamination_reads_rows_the_evaluate_reader_skips_for_their_labels_or_choices(tmp_path):
    """Labels are not needed, nor two choices; a row with no text is named by file and line (the file has a BOM)."""
    rows = [json.loads(line) for line in (MULTIPLE_CHOICE / "arc_easy" / "ARC-Easy-Dev.jsonl").read_text().splitlines()]
    rows[0]["answerKey"] = "Z"
    del rows[1]["answerKey"]
    rows[2]["question"]["choices"] = rows[2]["question"]["choices"][:1]
    rows[3]["question"]["choices"][0]["text"] = " "
    path = tmp_path / "ARC-Easy-Dev.jsonl"
    path.write_text("\ufeff" + "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    assert [bad.line for bad in read_choice_file("arc", path).bad] == [1, 2, 3, 4]
    texts = set(eval_texts(path))
    assert {row["question"]["stem"] for row in rows[:4]} <= texts
    assert f"{rows[2]['question']['stem']} {rows[2]['question']['choices'][0]['text']}" in texts
    rows[5]["question"]["stem"] = None
    path.write_text("\ufeff" + "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    with pytest.raises(StageError, match=r"ARC-Easy-Dev.jsonl:6: not a arc row \(field 'stem' is missing\)"):
        eval_texts(path)


def test_decontamination_against_arc_and_piqa_drops_pages_quoting_them(tmp_path):
    arc_row = json.loads((MULTIPLE_CHOICE / "arc_challenge" / "ARC-Challenge-Dev.jsonl").read_text().splitlines()[0])
    piqa_row = json.loads((MULTIPLE_CHOICE / "piqa" / "valid.jsonl").read_text().splitlines()[0])
    docs = [Document("web/arc", "Science homework help. " + arc_row["question"]["stem"] + " Any ideas?", "web"),
            Document("web/piqa", f"Pet tips: {piqa_row['goal']} {piqa_row['sol1']}", "web"),
            *curatedata.wiki_documents("en", 3)]
    input_dir = curatedata.write_documents(tmp_path / "documents", docs)
    eval_sets = [MULTIPLE_CHOICE / "arc_challenge" / "ARC-Challenge-Dev.jsonl", MULTIPLE_CHOICE / "piqa" / "valid.jsonl"]
    config = dedup.DedupConfig(minhash={"enabled": False}, decontaminate={"enabled": True, "eval_sets": eval_sets},
                               executor={"tasks": 1})
    ctx = make_ctx(tmp_path, input_dir, "mc")
    result = dedup.run(config, ctx)
    assert kept_ids(ctx) == {d.id for d in docs} - {"web/arc", "web/piqa"}
    assert result.stats["dropped/decontaminate/arc_challenge-ARC-Challenge-Dev"] == 1
    assert result.stats["dropped/decontaminate/piqa-valid"] == 1


def test_eval_texts_too_short_to_be_found_are_counted(deduped):
    _, result = deduped
    assert result.stats["decontaminate/sst2-dev/texts"] == 872
    assert result.stats["decontaminate/sst2-dev/texts_shorter_than_n_gram"] == 256   # 29% of SST-2 dev at 13-grams
