"""Hugging Face Hub datasets: which revision a source names, and opening its stream with retries.

`revision_signature` is what ingest's fingerprint sees for an `hf` source: the commit hash its
revision resolves to (`huggingface_hub`, one request bounded by a deadline), so a new upstream
commit makes the next plan rebuild ingest and everything after it. Offline (`HF_HUB_OFFLINE=1`), or
when the hub does not answer in time, it is the revision pinned in the recipe, else `unresolved`;
a full commit hash is used as it is, without asking. Resolved answers are remembered for a minute,
so a grid's plans ask once per source, while a long-lived process (a served deployment) still
sees new commits.

Retries are only for failures that can pass (a dropped connection, a timeout, HTTP 429 or 5xx):
`with_retries` retries opening a stream a few times with growing pauses. A missing dataset, a
wrong config name, offline mode or a missing library fail at once.
"""
from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

UNRESOLVED = "unresolved"
COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
RESOLVE_DEADLINE_S = 5.0         # `lmforge plan` waits at most this long per source for the hub
REMEMBER_S = 60.0
RETRY_ATTEMPTS = 4               # the first try and three retries
RETRY_FIRST_PAUSE_S = 2.0        # then 4 s, 8 s
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Exception classes, by name, of the connection and timeout errors of requests, httpx, aiohttp and the
# standard library: the hub clients raise any of them, and naming them spares importing them all.
TRANSIENT_NAMES = frozenset({"ConnectionError", "TimeoutError", "Timeout", "TimeoutException", "TransportError",
                             "ChunkedEncodingError", "ClientConnectionError", "ServerTimeoutError",
                             "ClientPayloadError", "IncompleteRead", "ProtocolError"})
PERMANENT_NAMES = frozenset({"OfflineModeIsEnabled"})   # a ConnectionError subclass that no retry cures

_remembered: dict[tuple[str, str | None, str | None], tuple[float, str]] = {}


def offline() -> bool:
    """`HF_HUB_OFFLINE`, `HF_DATASETS_OFFLINE` or `TRANSFORMERS_OFFLINE` set to a true value: no request is made."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES)


def revision_signature(dataset: str, revision: str | None, endpoint: str | None = None,
                       deadline_s: float = RESOLVE_DEADLINE_S) -> str:
    """The commit `revision` (None: the default branch) of hub dataset `dataset` names, for the fingerprint.

    A pinned commit hash as it is; offline or unanswered, the pinned revision, else `unresolved`.
    """
    if revision is not None and COMMIT_HASH.match(revision):
        return revision
    if offline():
        return revision or UNRESOLVED
    key = (dataset, revision, endpoint)
    known = _remembered.get(key)
    if known is not None and time.monotonic() - known[0] < REMEMBER_S:
        return known[1]
    try:
        commit = within(deadline_s, lambda: fetch_commit(dataset, revision, endpoint))
    except Exception as err:     # unreachable, unknown dataset, no huggingface_hub: the fingerprint says so
        log.warning("hub dataset %r revision %r: not resolved (%s: %s); the fingerprint uses %r", dataset,
                    revision, type(err).__name__, err, revision or UNRESOLVED)
        return revision or UNRESOLVED
    _remembered[key] = (time.monotonic(), commit)
    return commit


def forget_resolved() -> None:
    """Forget the remembered answers: the next plan asks the hub again."""
    _remembered.clear()


def fetch_commit(dataset: str, revision: str | None, endpoint: str | None = None) -> str:
    """The commit hash of `revision` of `dataset`, asked of the hub (or of `endpoint`)."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint).dataset_info(dataset, revision=revision, timeout=RESOLVE_DEADLINE_S)
    if not info.sha:
        raise ValueError(f"the hub's answer for {dataset!r} has no commit hash")
    return info.sha


def within(seconds: float, call: Callable[[], T]) -> T:
    """`call()`, or TimeoutError after `seconds` (left running in a daemon thread: DNS ignores timeouts)."""
    answer: queue.Queue = queue.Queue(maxsize=1)

    def target() -> None:
        try:
            answer.put((True, call()))
        except BaseException as err:
            answer.put((False, err))

    threading.Thread(target=target, daemon=True, name="hub-revision").start()
    try:
        ok, value = answer.get(timeout=seconds)
    except queue.Empty:
        raise TimeoutError(f"no answer within {seconds:g} s") from None
    if not ok:
        raise value
    return value


# --- retries ----------------------------------------------------------------------------------------

def is_transient(err: BaseException) -> bool:
    """A failure that may pass on a second try: a dropped connection, a timeout, HTTP 408/429/5xx.

    The cause chain is searched too (the datasets library wraps the client's errors).
    """
    seen = []
    while err is not None and err not in seen:
        seen.append(err)
        names = {cls.__name__ for cls in type(err).__mro__}
        if names & PERMANENT_NAMES:
            return False
        if names & TRANSIENT_NAMES or _status(err) in RETRY_STATUS:
            return True
        err = err.__cause__ or err.__context__
    return False


def _status(err: BaseException) -> int | None:
    status = getattr(getattr(err, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def with_retries(open_: Callable[[], T], what: str, attempts: int = RETRY_ATTEMPTS,
                 first_pause_s: float = RETRY_FIRST_PAUSE_S, sleep: Callable[[float], None] = time.sleep) -> T:
    """`open_()`, tried again after a pause (doubling each time) while it fails transiently, `attempts` times in all."""
    for attempt in range(1, attempts + 1):
        try:
            return open_()
        except Exception as err:
            if not is_transient(err) or attempt == attempts:
                raise
            pause = first_pause_s * 2 ** (attempt - 1)
            log.warning("%s: %s: %s; try %d of %d in %g s", what, type(err).__name__, err, attempt + 1, attempts,
                        pause)
            sleep(pause)
    raise AssertionError("unreachable")
