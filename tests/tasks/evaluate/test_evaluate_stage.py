"""The evaluate stage on a really pretrained tiny GPT and every real task file: outputs, recomputation, bad input."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import tinylm
import torch
from pydantic import ValidationError

from storage.formats import PredictionRow, TaskMetrics, read_predictions
from storage.stage import StageContext, StageError, StageResult
from tasks.datasets.multiple_choice import ChoiceItem, read_choice_file
from tasks.evaluate import STAGE, EvaluateConfig, external_inputs, run
from tasks.evaluate.prompts import draw_demonstrations
from tasks.evaluate.suite import task_metrics
from tasks.evaluate.unscramble import scramble, unscramble_items
from tasks.models import PretrainedModelError

DATA = tinylm.SHARED_DATA
MC = DATA / "multiple_choice"
WIKITEXT = str(DATA / "raw" / "wikitext-2_test.txt")
LIMIT = 24


def all_tasks(limit: int = LIMIT) -> list[dict]:
    """Every file of ../shared/data/multiple_choice, 0- and k-shot, and word unscrambling."""
    return [
        {"name": "arc_easy", "format": "arc", "path": str(MC / "arc_easy/ARC-Easy-Dev.jsonl"), "limit": limit},
        {"name": "arc_challenge_3shot", "format": "arc", "path": str(MC / "arc_challenge/ARC-Challenge-Dev.jsonl"),
         "limit": limit, "num_fewshot": 3},
        {"name": "piqa", "format": "piqa", "path": str(MC / "piqa/valid.jsonl"),
         "labels": str(MC / "piqa/valid-labels.lst"), "limit": limit},
        {"name": "winogrande_2shot", "format": "winogrande", "path": str(MC / "winogrande/dev.jsonl"),
         "labels": str(MC / "winogrande/dev-labels.lst"), "limit": limit, "num_fewshot": 2},
        {"name": "lambada", "format": "lambada", "path": str(MC / "lambada/lambada_test.jsonl"), "limit": limit},
        {"name": "swag", "format": "swag", "path": str(MC / "swag-sample.json")},
        {"name": "unscramble", "format": "unscramble", "path": WIKITEXT, "limit": limit, "num_fewshot": 3},
    ]


def context(root: Path, pretrain: Path, tokenizer: Path) -> StageContext:
    (root / "output").mkdir(parents=True)
    return StageContext(stage="evaluate", fingerprint="test", output=root / "output", scratch=root / "scratch",
                        inputs={"pretrain": pretrain, "tokenizer": tokenizer}, workspace=root)


def evaluate(root: Path, lm: tinylm.TinyLM, **config) -> tuple[Path, StageResult]:
    ctx = context(root, lm.pretrain, lm.tokenizer)
    return ctx.output, run(EvaluateConfig(**config), ctx)


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> tinylm.TinyLM:
    return tinylm.tiny_gpt(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, lm) -> tuple[Path, StageResult]:
    heldout = {"files": [WIKITEXT], "max_chars": 20_000, "stride": 32}
    return evaluate(tmp_path_factory.mktemp("evaluated"), lm, heldout=heldout, tasks=all_tasks())


def rows(out: Path, task: str) -> list[PredictionRow]:
    return list(read_predictions(out / task / "predictions.jsonl"))


def test_every_real_task_file_is_scored_and_written_as_the_design_says(evaluated):
    out, result = evaluated
    for task in all_tasks():
        name, folder = task["name"], out / task["name"]
        metrics = TaskMetrics.read(folder / "metrics.json").root
        described = json.loads((folder / "task.json").read_text())
        assert next(iter(metrics)) == described["official_metric"]
        assert metrics["examples"] == len(rows(out, name)) == (10 if name == "swag" else LIMIT)
        assert {f"{name}/{metric}": value for metric, value in metrics.items()}.items() <= result.stats.items()
        assert described["limit"] == task.get("limit") and described["num_fewshot"] == task.get("num_fewshot", 0)
    assert {"heldout/wikitext-2_test.txt/bpb", "aggregate/core"} <= set(result.stats)
    summary = json.loads((out / "results.json").read_text())
    assert summary["aggregate"]["core"] == result.stats["aggregate/core"] and summary["model"]["arch"] == "gpt"
    first_line = lambda task: json.loads((out / task / "predictions.jsonl").read_text().splitlines()[0])  # noqa: E731
    assert set(first_line("arc_easy")) == {"id", "prediction", "gold", "context", "continuations", "loglikelihoods",
                                           "greedy"}
    assert set(first_line("unscramble")) == {"id", "prediction", "gold", "context"}    # no null fields written
    heldout = json.loads((out / "heldout.json").read_text())
    assert heldout["stride"] == 32 and heldout["files"]["wikitext-2_test.txt"]["bytes"] <= 20_000 * 4
    assert 0 < heldout["files"]["wikitext-2_test.txt"]["bpb"] < math.log2(tinylm.VOCAB_SIZE) * 2


def test_every_number_recomputes_from_the_predictions_alone(evaluated):
    """An independent scorer: only predictions.jsonl and the rules task.json states."""
    out, result = evaluated
    centered = {}
    for task in all_tasks():
        name = task["name"]
        kind = json.loads((out / name / "task.json").read_text())["kind"]
        found, chance = _rescore(kind, rows(out, name))
        official = next(iter(TaskMetrics.read(out / name / "metrics.json").root))
        centered[name] = (found[official] - chance) / (1 - chance)
        for metric, value in found.items():
            assert result.stats[f"{name}/{metric}"] == pytest.approx(value, abs=1e-12), (name, metric)
        assert result.stats[f"{name}/centered"] == pytest.approx(centered[name], abs=1e-12)
    assert result.stats["aggregate/core"] == pytest.approx(sum(centered.values()) / len(centered), abs=1e-12)


def _rescore(kind: str, found: list[PredictionRow]) -> tuple[dict[str, float], float]:
    n = len(found)
    best = lambda values: values.index(max(values))  # noqa: E731  (the first of equal maxima)
    if kind == "generate":
        return {"exact_match": sum(r.prediction == r.gold for r in found) / n}, 0.0
    if kind == "cloze":
        return {"acc": sum(r.greedy[0] for r in found) / n,
                "ppl": math.exp(-sum(r.loglikelihoods[0] for r in found) / n)}, 0.0
    metrics = {"acc": sum(best(r.loglikelihoods) == r.gold for r in found) / n}
    if kind == "choice":   # acc_norm: per character of the choice, the leading delimiter ' ' not counted
        metrics["acc_norm"] = sum(best([ll / len(c[1:]) for ll, c in zip(r.loglikelihoods, r.continuations)]) == r.gold
                                  for r in found) / n
    return metrics, sum(1 / len(r.continuations) for r in found) / n


def test_acc_and_acc_norm_differ_on_a_crafted_example():
    # The short choice has the higher total log-likelihood, the long one the higher per character.
    row = PredictionRow(id="x", prediction=0, gold=1, context="Q:", continuations=[" no", " a much longer answer"],
                        loglikelihoods=[-3.0, -6.0], greedy=[False, False])
    metrics = task_metrics("choice", [row], [("no", "a much longer answer")])
    assert metrics["acc"] == 0.0 and metrics["acc_norm"] == 1.0 and next(iter(metrics)) == "acc_norm"
    assert metrics["chance"] == 0.5 and metrics["centered"] == 1.0
    tie = PredictionRow(id="y", prediction=0, gold=0, loglikelihoods=[-2.0, -2.0])
    assert task_metrics("schema", [tie], [("a", "b")])["acc"] == 1.0      # equal scores: the first wins


def test_kshot_prompts_never_contain_the_scored_item(evaluated):
    out, _ = evaluated
    items = {i.id: i for i in read_choice_file("arc", MC / "arc_challenge/ARC-Challenge-Dev.jsonl").items}
    for row in rows(out, "arc_challenge_3shot"):
        item = items[row.id]
        *demos, question = row.context.split("\n\n")
        assert len(demos) == 3 and question == item.contexts[0]
        own = [i.demonstration for i in items.values() if i.contexts == item.contexts]
        assert not set(demos) & set(own) and all(d in {i.demonstration for i in items.values()} for d in demos)
    for row in rows(out, "winogrande_2shot"):
        assert all(len(context.split("\n\n")) == 3 for context in row.context)


def test_demonstrations_are_seeded_per_item_and_skip_copies_of_the_scored_item():
    pool = read_choice_file("arc", MC / "arc_easy/ARC-Easy-Dev.jsonl").items
    item = pool[0]
    twin = ChoiceItem("twin-of-" + item.id, 0, item.contexts, item.continuations, item.label, item.choices)
    pool = [*pool[:1], twin, *pool[1:]]
    for k in (1, 5, 25):
        for salt in ("s1", "s2", "s3"):
            drawn = draw_demonstrations(item, pool, k, salt)
            assert len(drawn) == k and all(d.contexts != item.contexts for d in drawn)
    assert draw_demonstrations(item, pool, 5, "s1") == draw_demonstrations(item, pool, 5, "s1")
    assert draw_demonstrations(item, pool, 5, "s1") != draw_demonstrations(item, pool, 5, "s2")
    with pytest.raises(StageError, match="pool holds only 1 items"):
        draw_demonstrations(item, pool[:3], 2, "s1")


def test_scores_equal_the_harness_algorithm_run_on_the_exported_hf_model(evaluated, lm, tmp_path):
    """lm-evaluation-harness's `_encode_pair` + `_loglikelihood_tokens`, rewritten here on transformers."""
    import transformers   # the test extra: a missing one fails here, never skips
    from tasks.export import export

    folder = export(lm.pretrain, tmp_path / "hf", tokenizer=lm.tokenizer)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    out, _ = evaluated
    for name in ("arc_challenge_3shot", "winogrande_2shot", "lambada"):
        for row in rows(out, name)[:8]:
            contexts = row.context if isinstance(row.context, list) else [row.context] * len(row.continuations)
            for ctx, cont, ll, greedy in zip(contexts, row.continuations, row.loglikelihoods, row.greedy):
                expected, expected_greedy = _harness_loglikelihood(hf, tokenizer, ctx, cont)
                assert ll == pytest.approx(expected, abs=1e-3) and greedy == expected_greedy


def _harness_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_enc = tokenizer.encode(context, add_special_tokens=False)
    continuation_enc = whole[len(context_enc):]
    max_length = model.config.n_positions
    inp = torch.tensor([(context_enc + continuation_enc)[-(max_length + 1):][:-1]])
    with torch.no_grad():
        logits = torch.log_softmax(model(inp).logits.float(), dim=-1)[0, -len(continuation_enc):]
    target = torch.tensor(continuation_enc)
    return float(logits.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())


def test_the_same_config_gives_identical_outputs_and_batching_changes_no_prediction(tmp_path, lm):
    config = {"heldout": {"files": [WIKITEXT], "max_chars": 5000}, "tasks": all_tasks(limit=6)[:2]}
    first, _ = evaluate(tmp_path / "a", lm, **config)
    again, _ = evaluate(tmp_path / "b", lm, **config)
    small, _ = evaluate(tmp_path / "c", lm, **config, batch_tokens=64)
    for name in ("arc_easy/predictions.jsonl", "arc_easy/metrics.json", "arc_challenge_3shot/predictions.jsonl",
                 "results.json", "heldout.json"):
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    for task in ("arc_easy", "arc_challenge_3shot"):
        assert [r.prediction for r in rows(first, task)] == [r.prediction for r in rows(small, task)]
        for a, b in zip(rows(first, task), rows(small, task)):
            assert a.loglikelihoods == pytest.approx(b.loglikelihoods, abs=1e-4)


def test_bad_rows_are_counted_with_their_line_and_the_good_rows_still_scored(tmp_path, lm):
    lines = (MC / "arc_easy/ARC-Easy-Dev.jsonl").read_text().splitlines()
    broken = json.loads(lines[1])
    broken["question"]["choices"][2]["text"] = ""
    lines[1], lines[2], lines[4] = json.dumps(broken), lines[2].replace('"answerKey"', '"answer"'), "{oops"
    path = tmp_path / "arc-broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    task = {"name": "arc", "format": "arc", "path": str(path), "limit": 5}
    out, result = evaluate(tmp_path / "run", lm, tasks=[task])
    assert {k: v for k, v in result.stats.items() if "/dropped/" in k} == {
        "arc/dropped/empty_choice": 1, "arc/dropped/missing_field": 1, "arc/dropped/invalid_json": 1}
    assert [(b["where"], b["reason"]) for b in result.bad_inputs] == [
        ("line 2", "empty_choice"), ("line 3", "missing_field"), ("line 5", "invalid_json")]
    assert all(b["path"] == str(path) for b in result.bad_inputs)
    assert result.stats["arc/examples"] == 5 and [r.id for r in rows(out, "arc")][1] == json.loads(lines[3])["id"]
    assert json.loads((out / "arc" / "task.json").read_text())["skipped_rows"] == {
        "empty_choice": 1, "invalid_json": 1, "missing_field": 1}


def test_a_task_with_no_usable_rows_fails_naming_the_file(tmp_path, lm):
    path = tmp_path / "all-bad.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n')
    with pytest.raises(StageError, match=r"task 'arc': .*all-bad\.jsonl: no usable arc rows \(2 rows read; "
                                         r"skipped: missing_field\)"):
        evaluate(tmp_path / "run", lm, tasks=[{"name": "arc", "format": "arc", "path": str(path)}])


def test_a_model_with_another_tokenizer_is_refused(tmp_path, lm):
    import shardfixture

    other = shardfixture.write_tokenizer(tmp_path / "bytes")         # 262 ids; the model has 512
    ctx = context(tmp_path / "run", lm.pretrain, other)
    with pytest.raises(PretrainedModelError, match=r"vocabulary mismatch: the tokenizer .*bytes/tokenizer_config"
                                                   r"\.json has vocab_size 262, the model .* has 512"):
        run(EvaluateConfig(heldout={"files": [WIKITEXT], "max_chars": 1000}), ctx)


def test_stride_longer_than_the_window_is_refused(tmp_path, lm):
    with pytest.raises(StageError, match="heldout.stride=65 exceeds the model's seq_len 64"):
        evaluate(tmp_path / "run", lm, heldout={"files": [WIKITEXT], "stride": 65, "max_chars": 1000})


@pytest.fixture(scope="module")
def bert(tmp_path_factory, lm) -> Path:
    """A BERT (random weights) over the tiny GPT's tokenizer, saved as a model folder."""
    from storage.formats import ModelSpec
    from tasks.models import build_model
    from tasks.models.files import write_model
    from tasks.tokenizer import load_encoding

    encoding = load_encoding(lm.tokenizer)
    specials = {name: encoding.encode_single_token(name) for name in ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]")}
    spec = ModelSpec(arch="bert", n_layer=2, n_head=2, d_model=64, d_mlp=256, seq_len=64, vocab_size=512,
                     padded_vocab_size=512, norm="post", layer_norm_eps=1e-12, nsp=True, special_tokens=specials)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert") / "model"
    folder.mkdir()
    write_model(folder, build_model(spec).state_dict(), spec)
    return folder


def test_bert_gets_a_seeded_masked_lm_score_and_the_tasks_say_not_applicable(tmp_path, lm, bert):
    config = {"heldout": {"files": [WIKITEXT], "max_chars": 8000}, "tasks": all_tasks(limit=2)[:1]}

    def stats(name: str, **extra) -> tuple[Path, dict]:
        ctx = context(tmp_path / name, bert, lm.tokenizer)
        return ctx.output, run(EvaluateConfig(**{**config, **extra}), ctx).stats

    out, first = stats("a")
    _, again = stats("b", batch_tokens=64)
    _, reseeded = stats("c", seed=7)
    loss = first["heldout/wikitext-2_test.txt/mlm_loss"]
    assert loss == pytest.approx(again["heldout/wikitext-2_test.txt/mlm_loss"], rel=1e-6)
    assert loss != reseeded["heldout/wikitext-2_test.txt/mlm_loss"]
    assert math.log(512) - 0.5 < loss < math.log(512) + 0.5          # random weights: about uniform
    masked, tokens = first["heldout/wikitext-2_test.txt/masked_tokens"], first["heldout/wikitext-2_test.txt/tokens"]
    assert 0.10 < masked / tokens < 0.20
    assert first["arc_easy/not_applicable"] == 1 and "aggregate/core" not in first
    described = json.loads((out / "arc_easy" / "task.json").read_text())
    assert described["applicable"] is False and "BERT" in described["reason"]
    assert not (out / "arc_easy" / "metrics.json").exists()
    assert json.loads((out / "heldout.json").read_text())["stride"] is None     # its windows do not overlap
    _, strided = stats("d", heldout={**config["heldout"], "stride": 32}, tasks=[])
    assert strided["heldout/wikitext-2_test.txt/mlm_loss"] == loss        # a GPT's knob, read by no BERT


@pytest.mark.parametrize("change, message", [
    ({"tasks": [], "heldout": {}}, "evaluate has nothing to do"),
    ({"tasks": [{"name": "arc", "format": "arc", "path": "x", "labels": "y"}]}, "arc files carry their labels"),
    ({"tasks": [{"name": "piqa", "format": "piqa", "path": "x"}]}, "piqa needs `labels`"),
    ({"tasks": [{"name": "a", "format": "arc", "path": "x"}] * 2}, "names must be unique"),
    ({"tasks": [{"name": "Arc-1", "format": "arc", "path": "x"}]}, "tasks.0.name"),
    ({"tasks": [{"name": "a", "format": "mmlu", "path": "x"}]}, "tasks.0.format"),
    ({"tasks": [{"name": "a", "format": "arc", "path": "x", "fewshot_path": "y"}]}, "fewshot_path is unused"),
    ({"heldout": {"stride": 8}}, "heldout.stride and heldout.max_chars need heldout.files"),
    ({"heldout": {"files": ["a/t.txt", "b/t.txt"]}}, "two files share a name"),
    ({"tasks": [{"name": "a", "format": "arc", "path": "x", "limit": 0}]}, "tasks.0.limit"),
])
def test_config_errors_name_the_field(change, message):
    with pytest.raises(ValidationError, match=message):
        EvaluateConfig(**change)


def test_the_fingerprint_sees_every_named_file_and_not_the_batch_size(tmp_path):
    path = tmp_path / "arc.jsonl"
    shutil.copy(MC / "arc_easy/ARC-Easy-Dev.jsonl", path)
    config = EvaluateConfig(heldout={"files": [WIKITEXT]}, tasks=[{"name": "a", "format": "arc", "path": str(path)}])
    before = external_inputs(config)
    assert [entry[0] for entry in before["files"]] == [WIKITEXT, str(path)]
    path.write_text(path.read_text().replace("cellular telephone", "cell phone"))
    assert external_inputs(config) != before
    assert "batch_tokens" not in config.output_fields() and STAGE.seed_matters(config) is False


def test_unscramble_words_are_seeded_shuffles_of_the_inner_letters(tmp_path):
    items = unscramble_items(WIKITEXT, seed=1234)
    assert len(items) == 2000 and items == unscramble_items(WIKITEXT, seed=1234)
    assert [i.id for i in items] != [i.id for i in unscramble_items(WIKITEXT, seed=1)]
    for item in items[:200]:
        word, shown = item.choices[0], item.contexts[0].removesuffix(" =")
        assert shown != word and shown[0] == word[0] and shown[-1] == word[-1] and sorted(shown) == sorted(word)
        assert item.continuations == (f" {word}",) and item.demonstration == f"{shown} = {word}"
    assert scramble("chair", 1) == scramble("chair", 1) and len({scramble("balance", s) for s in range(20)}) > 3
    (tmp_path / "words.txt").write_text("ABC DEF 123 aaaa zzzzz\n")
    with pytest.raises(StageError, match=r"words\.txt: no lower-case words of 4 to 8 letters"):
        unscramble_items(tmp_path / "words.txt", seed=0)
