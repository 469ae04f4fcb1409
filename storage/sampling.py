"""Seeded, order-independent choices by key: one hash for every sample, split and held-out set.

Every use passes its own salt (`ingest-sample:<seed>`, `curate-sample:<seed>`, `shard-split`, ...), so
two choices over the same ids are independent: curate sampling half of what ingest sampled half of
keeps a quarter, and the validation split of a sampled corpus is still `val_fraction` of it. Two
uses with the same salt make the same choice (ingest's and curate's samples would coincide).
"""
from __future__ import annotations

import hashlib

# The salt ends at the first NUL, so no (salt, key) pair hashes the bytes of another pair.
SEPARATOR = b"\x00"


def unit_hash(salt: str, key: str) -> float:
    """A number in [0, 1) fixed by `salt` and `key`: the first 8 bytes of sha256(salt NUL key) / 2**64."""
    if "\x00" in salt:
        raise ValueError(f"salt {salt!r} must not contain NUL")
    data = salt.encode("utf-8") + SEPARATOR + key.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2**64


def keep(salt: str, key: str, rate: float) -> bool:
    """True for a `rate` share of keys (all of them at rate >= 1), the same keys every time."""
    return rate >= 1.0 or unit_hash(salt, key) < rate

