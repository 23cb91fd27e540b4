"""The labeling panel's proposals, computed ahead: a bounded cache keyed by series, model and served version."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

Key = tuple[str, str, int]
"""(series, model, served version): a proposal is the served version's prediction, never another's."""


class ProposalCache:
    """Proposals by (series, model, served version), each a ``Future`` started once and shared.

    A proposal asked for again (the hand-out started it, the viewer asks for it, the next case's was
    started ahead) is the same computation. Publishing new weights drops the model's proposals of the
    other versions (``start`` with the new version does), so a stale prediction is never answered and
    never holds memory; at most ``keep`` proposals are held, the oldest dropped first. A proposal that
    failed is computed again when asked.

    Args:
        executor: runs ``compute``.
        keep: how many proposals to hold at most.
    """

    def __init__(self, executor: Executor, *, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self._executor = executor
        self._keep = keep
        self._futures: OrderedDict[Key, Future[dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, key: Key, compute: Callable[[], dict[str, Any]]) -> tuple[Future[dict[str, Any]], bool]:
        """The proposal of ``key``, started now unless it was before; and whether it was (a hit)."""
        image, model, version = key
        with self._lock:
            for stale in [k for k in self._futures if k[1] == model and k[2] != version]:
                self._futures.pop(stale).cancel()  # weights changed: that prediction is no one's now
            future = self._futures.get(key)
            if future is not None and not (future.done() and future.exception() is not None):
                self._futures.move_to_end(key)
                return future, True
            future = self._executor.submit(compute)
            self._futures[key] = future
            while len(self._futures) > self._keep:
                self._futures.popitem(last=False)[1].cancel()
            return future, False

    def get(self, key: Key) -> Future[dict[str, Any]] | None:
        with self._lock:
            return self._futures.get(key)

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._futures)
