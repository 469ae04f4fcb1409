"""The GLUE loaders on every real GLUE file in ../shared/data/glue, and on broken copies of them."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tasks.datasets import GLUE_TASKS, DatasetError, glue_task, read_glue

GLUE = (Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "glue").resolve()
GLUE_FILES = sorted([*GLUE.rglob("*.tsv"), *GLUE.rglob("*.parquet")])   # every format the loader reads


def data_rows(path: Path) -> int:
    """Rows counted without the loader: non-blank lines, less the header (CoLA's train/dev have none)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    headerless = path.parent.name == "cola" and not lines[0].startswith(b"index")
    return len(lines) - (0 if headerless else 1)


def test_the_folder_holds_every_task():
    assert {p.parent.name for p in GLUE_FILES} >= {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}


@pytest.mark.parametrize("path", GLUE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_real_glue_file_yields_one_typed_example_per_row(path):
    task = glue_task(path)
    examples = read_glue(path)
    assert len(examples) == data_rows(path) > 0
    assert len({e.id for e in examples}) == len(examples)
    assert all(e.text_a.strip() for e in examples)
    assert all((e.text_b is not None) == bool(task.text_b) for e in examples)
    if task.is_regression:
        assert all(isinstance(e.label, float) and 0 <= e.label <= 5 for e in examples)
    else:
        assert {str(e.label) for e in examples if e.label is not None} <= set(task.labels)
        assert all(isinstance(e.label, int if task.labels == ("0", "1") else str) for e in examples)


def test_known_counts_and_labels():
    cola = read_glue(GLUE / "cola" / "dev.tsv")
    assert len(cola) == 1043 and Counter(e.label for e in cola) == {1: 721, 0: 322}
    assert cola[0].text_a == "The sailors rode the breeze clear of the rocks." and cola[-1].text_a.endswith("himself.")
    mrpc = read_glue(GLUE / "mrpc" / "dev.tsv")                 # header with a BOM: the label column is found
    assert len(mrpc) == 408 and Counter(e.label for e in mrpc) == {1: 279, 0: 129}
    assert mrpc[0].text_b.startswith('"The foodservice')          # a bare quote is a character, not CSV quoting
    rte = read_glue(GLUE / "rte" / "dev.tsv")
    assert len(rte) == 277 and Counter(e.label for e in rte) == {"entailment": 146, "not_entailment": 131}
    stsb = read_glue(GLUE / "stsb" / "dev.tsv")
    assert len(stsb) == 1500 and stsb[0].label == 5.0 and stsb[1].label == 4.75
    assert min(e.label for e in stsb) == 0.0 and max(e.label for e in stsb) == 5.0
    mnli = read_glue(GLUE / "mnli" / "dev_matched.head5.tsv")      # the 16-column dev header
    assert mnli[0].text_a == "The new rights are nice enough" and mnli[0].label in GLUE_TASKS["mnli"].labels
    qqp = read_glue(GLUE / "qqp" / "dev.head9.tsv")
    assert qqp[0].id == "201359" and qqp[0].text_b == "Why are hispanics so beautiful?"
    assert len(read_glue(GLUE / "sst2" / "dev.tsv")) == 872       # header renamed `text\tlabel`


def copy_with(tmp_path: Path, task: str, source: Path, edit) -> Path:
    """A copy of a real GLUE file in a folder named after its task, its lines changed by `edit`."""
    folder = tmp_path / task
    folder.mkdir(exist_ok=True)
    lines = source.read_text(encoding="utf-8-sig").split("\n")
    target = folder / source.name
    target.write_text("\n".join(edit(lines)), encoding="utf-8")
    return target


def test_a_malformed_row_names_the_file_and_line(tmp_path):
    rte = GLUE / "rte" / "dev.tsv"
    missing_field = copy_with(tmp_path, "rte", rte, lambda lines: [*lines[:4], lines[4].rsplit("\t", 1)[0], *lines[5:]])
    with pytest.raises(DatasetError, match=r"rte/dev.tsv:5: expected 4 tab-separated fields, found 3"):
        read_glue(missing_field)
    bad_label = copy_with(tmp_path, "rte", rte, lambda lines: [*lines[:2], lines[2].rsplit("\t", 1)[0] + "\tmaybe",
                                                               *lines[3:]])
    with pytest.raises(DatasetError, match=r"dev.tsv:3: rte label 'maybe' is not one of \['entailment', "):
        read_glue(bad_label)
    stsb = copy_with(tmp_path, "stsb", GLUE / "stsb" / "dev.tsv", lambda lines: [*lines[:7], lines[7][:-5] + "7.500"])
    with pytest.raises(DatasetError, match=r"stsb/dev.tsv:8: stsb score '7.500' is not a number in \[0, 5\]"):
        read_glue(stsb)
    no_text = copy_with(tmp_path, "qnli", GLUE / "qnli" / "dev.tsv", lambda lines: ["index\tlabel", "0\tentailment"])
    with pytest.raises(DatasetError, match=r"dev.tsv:1: no qnli text column in header \['index', 'label'\]"):
        read_glue(no_text)


def test_the_task_comes_from_the_folder_or_the_argument(tmp_path):
    assert glue_task(Path("glue_data/SST-2/dev.tsv")).name == "sst2"
    assert glue_task(Path("glue_data/STS-B/dev.tsv")).name == "stsb"
    assert glue_task(Path("glue_data/CoLA/dev.tsv")).name == "cola"
    elsewhere = copy_with(tmp_path, "my_eval", GLUE / "rte" / "dev.tsv", lambda lines: lines)
    with pytest.raises(DatasetError, match="my_eval.*is not a GLUE task"):
        read_glue(elsewhere)
    assert len(read_glue(elsewhere, task="rte")) == 277


def test_test_files_without_labels(tmp_path):
    """GLUE's test files: a header (CoLA's too) and no label column; built here from the real dev rows."""
    cola = copy_with(tmp_path, "cola", GLUE / "cola" / "dev.tsv",
                     lambda lines: ["index\tsentence", *(f"{i}\t{line.split(chr(9))[3]}" for i, line in
                                                         enumerate(lines) if line)])
    examples = read_glue(cola)
    assert len(examples) == 1043 and all(e.label is None for e in examples)
    assert examples[0].id == "0" and examples[0].text_a == "The sailors rode the breeze clear of the rocks."
    rte = copy_with(tmp_path, "rte", GLUE / "rte" / "dev.tsv",
                    lambda lines: [line.rsplit("\t", 1)[0] for line in lines if line])
    assert [e.label for e in read_glue(rte)] == [None] * 277


def test_a_renamed_header_is_read_with_a_warning(shared_data, caplog):
    with caplog.at_level("WARNING", logger="tasks.datasets.glue"):
        examples = read_glue(shared_data / "glue/sst2/dev.tsv")
    assert len(examples) == 872
    assert "header column 'text' read as GLUE's 'sentence'" in caplog.text
    caplog.clear()
    read_glue(shared_data / "glue/rte/dev.tsv")
    assert "renamed header" not in caplog.text


def hf_layout(examples, task: str, path):
    """The examples written as nyu-mll/glue's Parquet: its column names, class indices, `idx`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.datasets.glue import GLUE_TASKS, HF_TEXT_COLUMNS

    spec, (a, b) = GLUE_TASKS[task], HF_TEXT_COLUMNS[task]
    labels = [e.label if spec.is_regression else spec.labels.index(str(e.label)) for e in examples]
    columns = {a: [e.text_a for e in examples], "label": labels, "idx": list(range(len(examples)))}
    if b:
        columns[b] = [e.text_b for e in examples]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("task, file", [("rte", "rte/dev.tsv"), ("stsb", "stsb/dev.tsv"), ("cola", "cola/dev.tsv"),
                                        ("mnli", "mnli/dev_matched.head5.tsv"), ("mrpc", "mrpc/dev.tsv")])
def test_the_hf_parquet_layout_reads_into_the_same_examples(shared_data, tmp_path, task, file):
    tsv = read_glue(shared_data / "glue" / file)
    parquet = read_glue(hf_layout(tsv, task, tmp_path / task / "validation-00000-of-00001.parquet"))
    assert [(e.text_a, e.text_b, e.label) for e in parquet] == [(e.text_a, e.text_b, e.label) for e in tsv]
    assert [e.id for e in parquet] == [str(i) for i in range(len(tsv))]


def test_hf_test_splits_have_no_labels_and_bad_indices_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rte" / "test-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [-1, 7], "idx": [0, 1]}), path)
    with pytest.raises(DatasetError, match=r"row 2: rte label 7 is not a class index 0..1"):
        read_glue(path)
    bad = []
    assert [e.label for e in read_glue(path, on_bad=bad.append)] == [None]
    assert [(b.line, b.reason) for b in bad] == [(2, "unknown_label")]
    wrong = tmp_path / "sst2" / "train.parquet"
    wrong.parent.mkdir()
    pq.write_table(pa.table({"text": ["x"], "label": [1]}), wrong)
    with pytest.raises(DatasetError, match="not nyu-mll/glue's sst2 layout"):
        read_glue(wrong)


def test_a_bad_first_row_of_a_headerless_file_is_reported_like_any_other(tmp_path):
    """CoLA's first line is data: a bad label or a short row there is skipped and reported (file, line 1),
    not a failure of the whole file."""
    for first in (lambda row: row.replace("\t1\t", "\t3\t", 1), lambda row: row.rsplit("\t", 1)[0]):
        cola = copy_with(tmp_path, "cola", GLUE / "cola" / "dev.tsv", lambda lines: [first(lines[0]), *lines[1:]])
        bad = []
        examples = read_glue(cola, on_bad=bad.append)
        assert len(examples) == 1042 and examples[0].id == "1"
        assert [(b.line, b.reason) for b in bad] in ([(1, "unknown_label")], [(1, "wrong_column_count")])
        with pytest.raises(DatasetError, match=r"cola/dev.tsv:1: "):
            read_glue(cola)
