import subprocess
import sys
from typing import ClassVar

from storage.configbase import StrictModel
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
