"""The finetune stage on a tiny model pretrained by the real stages: outputs, rescoring, bad input, determinism,
launchers, MLflow, and that fine-tuning learns (SST-2 above the majority class; pretrained above random init).

One GPT is pretrained for the module (~1 minute: 1,000 steps of a 2-layer, 64-wide model on the English
wiki summaries); every fine-tuning run here is small (a few hundred examples, one epoch) except the two
learning tests.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import ftfixture as fx
import pytest
from mlflow.tracking import MlflowClient

from storage.formats import TaskMetrics, TokenizerFile, read_predictions
from storage.stage import StageError
from storage.workspace import file_entries, output_digest
from tasks.datasets.squad import read_squad
from tasks.finetune import STAGE as FINETUNE
from tasks.finetune import FinetuneConfig, run
from tasks.finetune import metrics as m
from tasks.finetune.checkpoint import load_finetuned
from tasks.finetune.conlleval import conll_scores
from tasks.finetune.squad_eval import squad_scores

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
GLUE, SQUAD, FOMC = DATA / "glue", DATA / "squad", DATA / "finance" / "fomc_hawkish_dovish"
FAST = {"epochs": 1, "lr": 1e-3, "batch_size": 16}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> fx.Pretrained:
    return fx.build_pretrained(tmp_path_factory.mktemp("gpt"), "gpt", steps=1000, docs=10000)


def finetune(root: Path, pretrained: fx.Pretrained, tasks: list[dict], seed: int = 0, **fields: object):
    config = FinetuneConfig.model_validate({"tasks": tasks, "precision": "fp32", "progress": False, **fields})
    ctx = fx.finetune_context(root, pretrained, seed)
    return run(config, ctx), ctx.output


ALL_KINDS = [
    {"name": "sst2", "kind": "glue", "train": str(GLUE / "sst2/train.head5000.tsv"), "eval": str(GLUE / "sst2/dev.tsv"),
     "max_train_examples": 300, "max_eval_examples": 100, **FAST},
    {"name": "stsb", "kind": "glue", "train": str(GLUE / "stsb/train.tsv"), "eval": str(GLUE / "stsb/dev.tsv"),
     "max_train_examples": 200, "max_eval_examples": 60, **FAST},
    {"name": "mnli", "kind": "glue", "train": str(GLUE / "mnli/dev_matched.head5.tsv"),
     "eval": {"m": str(GLUE / "mnli/dev_matched.head5.tsv"), "mm": str(GLUE / "mnli/dev_mismatched.head5.tsv")},
     **FAST},
    {"name": "squad2", "kind": "squad", "train": str(SQUAD / "dev-v2.0-subset.json"), "split": {"eval_fraction": 0.3},
     "max_train_examples": 120, "max_eval_examples": 80, "max_query_length": 24, **FAST},
    {"name": "ner", "kind": "conll", "train": str(DATA / "ner/conll2003-valid.txt"),
     "eval": str(DATA / "ner/conll2003-test.txt"), "max_train_examples": 200, "max_eval_examples": 80, **FAST},
    {"name": "fomc", "kind": "fomc", "train": str(FOMC / "lab-manual-combine-train-5768.csv"),
     "eval": str(FOMC / "lab-manual-combine-test-5768.csv"), "max_train_examples": 200,
     "max_eval_examples": 120, **FAST},
    {"name": "arc", "kind": "multiple_choice", "format": "arc",
     "train": str(DATA / "multiple_choice/arc_easy/ARC-Easy-Dev.jsonl"),
     "split": {"eval_fraction": 0.3}, "max_train_examples": 120, "max_eval_examples": 60, **FAST},
]


@pytest.fixture(scope="module")
def every_kind(pretrained: fx.Pretrained, tmp_path_factory: pytest.TempPathFactory):
    """One run over a task of every kind, tracked in a real MLflow sqlite store."""
    root = tmp_path_factory.mktemp("kinds")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.create_experiment("t", artifact_location=(root / "artifacts").as_uri())
    stage_run = client.create_run(experiment, run_name="finetune").info.run_id
    config = FinetuneConfig.model_validate({"tasks": ALL_KINDS, "precision": "fp32", "progress": False})
    ctx = fx.finetune_context(root, pretrained, 0, mlflow_tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                              mlflow_run_id=stage_run)
    return run(config, ctx), ctx.output, client, stage_run


def rows(folder: Path) -> list:
    return list(read_predictions(folder / "predictions.jsonl"))


def test_every_task_writes_metrics_official_first_and_stats(every_kind):
    result, output, _, _ = every_kind
    expected = {"sst2": "accuracy", "stsb": "pearson", "mnli-m": "accuracy", "mnli-mm": "accuracy", "squad2": "exact",
                "ner": "f1", "fomc": "f1_weighted", "arc": "accuracy"}
    for folder, official in expected.items():
        metrics = TaskMetrics.read(output / folder / "metrics.json").root
        assert next(iter(metrics)) == official, folder
        assert all(result.stats[f"{folder}/{name}"] == value for name, value in metrics.items())
    assert len(rows(output / "sst2")) == 100 and len(rows(output / "mnli-mm")) == 5
    header, _, scores, sizes = (output / "glue_table.md").read_text().splitlines()[:4]
    columns = [c.strip() for c in header.split("|")[1:-1]]
    cell = dict(zip(columns, [c.strip() for c in scores.split("|")[1:-1]]))
    accuracy = TaskMetrics.read(output / "sst2/metrics.json").root["accuracy"]
    assert cell["SST-2"] == f"{accuracy * 100:.1f}" and cell["QQP"] == "-" and "/" in cell["MNLI-m/mm"]
    assert "300 / 100" in sizes


def test_scores_recompute_from_the_predictions(every_kind):
    _, output, _, _ = every_kind
    sst2 = rows(output / "sst2")
    assert TaskMetrics.read(output / "sst2/metrics.json").root["accuracy"] == \
        m.accuracy([r.prediction for r in sst2], [r.gold for r in sst2])
    stsb = rows(output / "stsb")
    assert TaskMetrics.read(output / "stsb/metrics.json").root["spearmanr"] == \
        pytest.approx(m.spearmanr([r.prediction for r in stsb], [r.gold for r in stsb]))
    ner = rows(output / "ner")
    assert TaskMetrics.read(output / "ner/metrics.json").root["f1"] == \
        conll_scores([r.prediction for r in ner], [r.gold for r in ner])["f1"]
    fomc = rows(output / "fomc")
    assert TaskMetrics.read(output / "fomc/metrics.json").root["f1_weighted"] == \
        pytest.approx(m.f1_weighted([r.prediction for r in fomc], [r.gold for r in fomc]))
    arc = rows(output / "arc")
    assert len(arc) == 60 and {r.prediction for r in arc} <= {0, 1, 2, 3}
    assert TaskMetrics.read(output / "arc/metrics.json").root["accuracy"] == \
        m.accuracy([r.prediction for r in arc], [r.gold for r in arc])


def test_squad_writes_the_official_files_for_every_question(every_kind):
    _, output, _, _ = every_kind
    predictions = json.loads((output / "squad2/predictions.json").read_text())
    null_odds = json.loads((output / "squad2/null_odds.json").read_text())
    ids = [r.id for r in rows(output / "squad2")]
    assert list(predictions) == ids == list(null_odds) and len(ids) == 80
    examples = {e.id: e for e in read_squad(SQUAD / "dev-v2.0-subset.json")}
    scores = squad_scores([examples[i] for i in ids], predictions, null_odds)
    assert scores == pytest.approx(TaskMetrics.read(output / "squad2/metrics.json").root)
    assert all(p == "" or p in examples[q].context for q, p in predictions.items())


def test_fomc_sentiment_index_recomputes_per_year(every_kind):
    _, output, _, _ = every_kind
    index = json.loads((output / "fomc/sentiment_index.json").read_text())
    predicted = {r.id: r.prediction for r in rows(output / "fomc")}
    for year, entry in index["by_year"].items():
        counts = Counter(predicted[i] for i in entry["ids"])
        assert dict(sorted(counts.items())) == entry["predicted"], year
        total = counts["dovish"] + counts["hawkish"]
        assert entry["index"] == ((counts["dovish"] - counts["hawkish"]) / total if total else None)


def test_the_finetuned_model_and_its_description_are_saved(every_kind):
    _, output, _, _ = every_kind
    model, spec = load_finetuned(output / "ner/model")
    head = model.head_spec
    assert head.kind == "tag" and head.labels[0] == "O" and head.family == "gpt" and spec.arch == "gpt"
    assert set(head.task_tokens) == {"start", "delim", "extract"}
    task = json.loads((output / "squad2/task.json").read_text())
    assert task["notes"][0].startswith("evaluation set carved out of") and task["hyperparameters"]["doc_stride"] == 32


def test_each_task_has_a_nested_mlflow_run_with_its_learning_curve(every_kind):
    _, _, client, stage_run = every_kind
    experiment = client.get_run(stage_run).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{stage_run}'")
    by_task = {r.data.tags["lmforge.task"]: r for r in runs}
    assert set(by_task) == {"sst2", "stsb", "mnli", "squad2", "ner", "fomc", "arc"}
    sst2 = by_task["sst2"]
    assert sst2.info.status == "FINISHED" and sst2.data.tags["lmforge.stage"] == "finetune"
    assert {"lmforge.pid", "lmforge.host"} <= set(sst2.data.tags)
    assert "accuracy" in sst2.data.metrics and "mnli-mm/accuracy" in by_task["mnli"].data.metrics
    curve = client.get_metric_history(sst2.info.run_id, "loss")
    assert len(curve) >= 2 and sst2.data.params["lr"] == "0.001"


def test_same_recipe_same_scores(pretrained, tmp_path):
    task = {**ALL_KINDS[0], "max_train_examples": 64, "max_eval_examples": 40}
    first, out1 = finetune(tmp_path / "a", pretrained, [task])
    second, out2 = finetune(tmp_path / "b", pretrained, [task], eval_batch_size=3)   # not in the fingerprint
    assert first.stats == second.stats
    assert (out1 / "sst2/predictions.jsonl").read_bytes() == (out2 / "sst2/predictions.jsonl").read_bytes()
    # the same output as the workspace digests it (the learning curves' timings left out): nothing downstream rebuilds
    ignores = FINETUNE.digest_ignores
    assert output_digest(file_entries(out1), ignores) == output_digest(file_entries(out2), ignores)
    third, _ = finetune(tmp_path / "c", pretrained, [task], seed=1)
    assert (tmp_path / "c/finetune/sst2/model/model.safetensors").read_bytes() != \
        (out1 / "sst2/model/model.safetensors").read_bytes()


def test_dev_set_epoch_selection_is_reported_as_such(pretrained, tmp_path):
    task = {**ALL_KINDS[0], "max_train_examples": 64, "max_eval_examples": 40, "epochs": 3, "select_best_epoch": True}
    result, output = finetune(tmp_path, pretrained, [task])
    summary = json.loads((output / "sst2/task.json").read_text())
    assert result.stats["sst2/selected_epoch"] == summary["selected_epoch"] in (1, 2, 3)
    assert any(note.startswith("dev-set selection: epoch") for note in summary["notes"])
    kept = sorted(p.name for p in (tmp_path / "finetune.scratch/sst2/pretrained-100/checkpoints").iterdir())
    assert kept == ["step-12", "step-4", "step-8"]                          # one checkpoint per epoch of 4 steps
    predictions = rows(output / "sst2")
    assert result.stats["sst2/accuracy"] == m.accuracy([r.prediction for r in predictions],
                                                       [r.gold for r in predictions])


def test_torchrun_gives_the_in_process_result(pretrained, tmp_path):
    task = {**ALL_KINDS[0], "max_train_examples": 64, "max_eval_examples": 40}
    inprocess, out1 = finetune(tmp_path / "a", pretrained, [task], launcher="inprocess")
    torchrun, out2 = finetune(tmp_path / "b", pretrained, [task], launcher="torchrun")
    assert inprocess.stats == torchrun.stats
    assert (tmp_path / "b/finetune.scratch/sst2/pretrained-100/torchrun.log").exists()


def test_bad_rows_are_counted_with_file_and_line(pretrained, tmp_path):
    lines = (GLUE / "sst2/dev.tsv").read_text().splitlines()
    broken = tmp_path / "sst2" / "dev.tsv"
    broken.parent.mkdir()
    bad = ["no tab here", lines[40] + "\textra", "a film .\t7", "\t1"]    # lines 41-44
    broken.write_text("\n".join([lines[0], *lines[1:40], *bad]) + "\n")
    fpb = tmp_path / "fpb.txt"
    fpb.write_bytes(b"".join(b"Profit rose %d .@positive\nno separator\nLoss widened %d .@negative\n" % (i, i)
                             for i in range(20)))
    tasks = [{"name": "sst2", "kind": "glue", "train": str(broken), "eval": str(broken), **FAST},
             {"name": "fpb", "kind": "phrasebank", "train": str(fpb), "split": {"eval_fraction": 0.5}, **FAST}]
    result, _ = finetune(tmp_path / "run", pretrained, tasks)
    # the same broken file is read as train and as eval: each bad row is counted for both reads
    assert result.stats["sst2/bad/wrong_column_count"] == 4 and result.stats["sst2/bad/unknown_label"] == 2
    assert result.stats["sst2/bad/empty_text"] == 2 and result.stats["fpb/bad/no_label_separator"] == 20
    where = {(b["reason"], b.get("where")) for b in result.bad_inputs if b["path"] == str(broken)}
    assert where == {("wrong_column_count", "41"), ("wrong_column_count", "42"), ("unknown_label", "43"),
                     ("empty_text", "44")}
    assert result.stats["sst2/train_examples"] == 39


def test_unusable_inputs_fail_naming_the_task_and_file(pretrained, tmp_path):
    empty = tmp_path / "sst2" / "train.tsv"
    empty.parent.mkdir()
    empty.write_text("sentence\tlabel\n\t0\n")
    with pytest.raises(StageError, match=r"task 'sst2': .*train.tsv has no usable rows"):
        finetune(tmp_path / "a", pretrained, [{**ALL_KINDS[0], "train": str(empty)}])
    with pytest.raises(StageError, match=r"task 'sst2': 'hf:nyu-mll/glue' is a hub dataset.*give the file's path"):
        finetune(tmp_path / "b", pretrained, [{**ALL_KINDS[0], "train": "hf:nyu-mll/glue"}])
    with pytest.raises(StageError, match=r"task 'sst2': data file .*nope.tsv not found"):
        finetune(tmp_path / "c", pretrained, [{**ALL_KINDS[0], "eval": str(tmp_path / "nope.tsv")}])


def test_a_tokenizer_that_does_not_match_the_model_is_refused_before_training(pretrained, tmp_path):
    other = tmp_path / "tokenizer"
    shutil.copytree(pretrained.tokenizer, other)
    config = TokenizerFile.read(other / "tokenizer_config.json")
    config.model_copy(update={"vocab_size": config.vocab_size + 1}).write(other / "tokenizer_config.json")
    with pytest.raises(StageError, match="vocabulary mismatch"):
        finetune(tmp_path / "run", fx.Pretrained(other, pretrained.pretrain), [ALL_KINDS[0]])
    assert not (tmp_path / "run/finetune.scratch/sst2").exists()


# ---- learning ----------------------------------------------------------------------------------


def test_finetuned_on_sst2_it_beats_the_majority_class(pretrained, tmp_path):
    task = {**ALL_KINDS[0], "max_train_examples": None, "max_eval_examples": None, "epochs": 3, "lr": 1e-3,
            "batch_size": 32}
    result, output = finetune(tmp_path, pretrained, [task])
    golds = [r.gold for r in rows(output / "sst2")]
    majority = Counter(golds).most_common(1)[0][1] / len(golds)
    assert len(golds) == 872 and result.stats["sst2/accuracy"] > majority + 0.05


def test_pretrained_beats_random_init_on_the_topic_task_at_a_tenth_of_its_data(pretrained, tmp_path):
    from tasks.datasets.wiki_topic import read_wiki_topic, split_wiki_topic, summaries_path

    tenth = round(0.1 * len(split_wiki_topic(read_wiki_topic(summaries_path("en")), "train")))
    task = {"name": "topic", "kind": "wiki_topic", "epochs": 10, "lr": 1e-3, "batch_size": 16,
            "max_train_examples": tenth, "max_eval_examples": 600}
    scores = {init: finetune(tmp_path / init, pretrained, [task], init=init)[0].stats["topic/accuracy"]
              for init in ("pretrained", "random")}
    assert scores["pretrained"] > scores["random"] + 0.03, scores


def test_a_sample_efficiency_curve_compares_inits_on_nested_subsets(pretrained, tmp_path):
    task = {**ALL_KINDS[0], "max_train_examples": 64, "max_eval_examples": 40,
            "sample_efficiency": {"fractions": [0.25, 0.5, 1.0], "inits": ["pretrained", "random"]}}
    result, output = finetune(tmp_path, pretrained, [task])
    curve = json.loads((output / "sst2/curve.json").read_text())
    assert curve["sizes"] == {"0.25": 16, "0.5": 32, "1.0": 64} and curve["metric"] == "accuracy"
    assert result.stats["sst2/curve/pretrained/100/accuracy"] == result.stats["sst2/accuracy"]   # the main run
    assert {k for k in result.stats if "/curve/" in k} == {f"sst2/curve/{i}/{p}/accuracy" for i in
                                                          ("pretrained", "random") for p in (25, 50, 100)}
    assert (output / "sst2/sample_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 25% | 16 |" in (output / "sst2/curve.md").read_text()


# ---- BERT ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> fx.Pretrained:
    return fx.build_pretrained(tmp_path_factory.mktemp("bert"), "bert", steps=150, docs=3000)


def test_bert_reads_cls_pairs_spans_and_tags(bert, tmp_path):
    tasks = [{**t, "max_train_examples": 48, "max_eval_examples": 24} for t in ALL_KINDS if t["name"] in
             ("sst2", "stsb", "squad2", "ner", "arc")]
    result, output = finetune(tmp_path, bert, tasks)
    for name in ("sst2", "stsb", "squad2", "ner", "arc"):
        model, spec = load_finetuned(output / name / "model")
        assert spec.arch == "bert" and model.head_spec.family == "bert" and model.head_spec.task_tokens == {}
        assert json.loads((output / name / "task.json").read_text())["hyperparameters"]["lm_weight"] == 0.0
    assert len(json.loads((output / "squad2/predictions.json").read_text())) == 24
    assert {"sst2/accuracy", "stsb/pearson", "squad2/exact", "ner/f1", "arc/accuracy"} <= set(result.stats)


@pytest.mark.parametrize("fields, named", [
    ({"task_tokens": {"start": "[CLS]"}}, r"task_tokens\.start"),
    ({"tasks": [{**ALL_KINDS[0], "lm_weight": 1.0}]}, r"tasks\[sst2\]\.lm_weight=1"),
])
def test_gpt1_knobs_are_refused_for_a_bert_instead_of_doing_nothing(bert, tmp_path, fields, named):
    """A BERT has no task tokens and no auxiliary LM loss: these fields used to be ignored silently (yet fingerprinted)."""
    with pytest.raises(StageError, match=named + r".*the pretrained model is a BERT"):
        finetune(tmp_path, bert, **{"tasks": [ALL_KINDS[0]], **fields})
    assert not (tmp_path / "finetune" / "sst2").exists()
