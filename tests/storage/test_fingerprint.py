import subprocess
import sys
from typing import ClassVar

from storage.configbase import StrictModel, SwitchableStep
from storage.fingerprint import fingerprint


class Inner(StrictModel):
    threshold: float = 0.5
    workers: int = 1
    non_output_fields: ClassVar[frozenset[str]] = frozenset({"workers"})


class Outer(StrictModel):
    inner: Inner = Inner()
    vocab: int = 100
    progress: bool = True
    non_output_fields: ClassVar[frozenset[str]] = frozenset({"progress"})


def fp(config: Outer, version: str = "1", inputs: dict | None = None) -> str:
    return fingerprint("stage", version, config.output_fields(), inputs or {"documents": "abc"})


def test_fingerprint_is_short_hex_and_stable_across_processes():
    here = fp(Outer())
    code = ("import sys; sys.path.insert(0, 'tests/storage'); from test_fingerprint import fp, Outer; "
            "print(fp(Outer()))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert here == there
    assert len(here) == 12 and int(here, 16) >= 0


def test_fingerprint_changes_with_output_fields_version_and_inputs():
    base = fp(Outer())
    assert fp(Outer(vocab=101)) != base
    assert fp(Outer(inner=Inner(threshold=0.6))) != base
    assert fp(Outer(), version="2") != base
    assert fp(Outer(), inputs={"documents": "abd"}) != base


def test_fingerprint_ignores_fields_that_do_not_change_output():
    base = fp(Outer())
    assert fp(Outer(progress=False)) == base
    assert fp(Outer(inner=Inner(workers=8))) == base


def test_key_order_does_not_matter():
    a = fingerprint("s", "1", {"a": 1, "b": {"x": 1, "y": 2}}, {})
    b = fingerprint("s", "1", {"b": {"y": 2, "x": 1}, "a": 1}, {})
    assert a == b


class Step(SwitchableStep):
    threshold: float = 0.5
    language: str = "en"
    used_while_disabled: ClassVar[frozenset[str]] = frozenset({"language"})


def test_a_switched_off_step_fingerprints_as_its_defaults_whatever_thresholds_it_carries():
    off = Step(enabled=False).output_fields()
    assert Step(enabled=False, threshold=0.9).output_fields() == off
    assert off == {**Step().output_fields(), "enabled": False}       # flipping the switch alone: as before
    assert Step(threshold=0.9).output_fields() != Step().output_fields()
    assert Step(enabled=False, language="fr").output_fields() != off   # read by another step, so it counts


def test_the_dedup_steps_switched_off_ignore_their_knobs():
    from tasks.dedup.config import DedupConfig

    off = DedupConfig(minhash={"enabled": False}).output_fields()
    assert DedupConfig(minhash={"enabled": False, "n_grams": 3, "num_buckets": 2}).output_fields() == off
    decontaminate = DedupConfig(decontaminate={"eval_sets": ["dev.tsv"], "n_gram": 8}).output_fields()
    assert decontaminate == DedupConfig().output_fields()
