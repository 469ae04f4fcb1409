"""A micro-batch as loaders hand it to the loop, and the thread that reads them ahead."""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class Batch:
    """One micro-batch as a loader made it: arrays for `Objective.inputs`, the loader position right after it."""

    arrays: dict[str, Any]            # numpy arrays from the loader; CPU tensors once the loop has them
    position: dict[str, int]          # JSON-able; handed back to `train_batches` to resume after this batch
    tokens: int                       # real (non-padding) tokens, for throughput
    consumed: int = 0                 # units of the training set the loader passed over for it (`Objective.epoch_size`)


class Prefetcher:
    """Runs an iterator in a background thread, `depth` items ahead; errors surface in the consumer."""

    _DONE = object()

    def __init__(self, items: Iterator[Any], transform: Callable[[Any], Any] = lambda x: x, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(items, transform), daemon=True)
        self._thread.start()

    def _fill(self, items: Iterator[Any], transform: Callable[[Any], Any]) -> None:
        try:
            for item in items:
                if not self._put((True, transform(item))):
                    return
        except BaseException as exc:       # handed to the consumer, which re-raises it
            self._put((False, exc))
            return
        self._put((True, self._DONE))

    def _put(self, entry: tuple[bool, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        ok, item = self._queue.get()
        if not ok:
            raise item
        if item is self._DONE:
            raise StopIteration
        return item

    def close(self) -> None:
        """Stops the thread and waits for it, so it is never cut off inside a native call at exit."""
        self._stop.set()
        self._thread.join(timeout=30)
