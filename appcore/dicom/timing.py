"""Seconds per stage of one request: the labeling routes' profile, logged and answered as ``timings``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

logger = logging.getLogger(__name__)


class Stopwatch:
    """Seconds spent in each stage of one request, logged and answered as ``timings``."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.seconds: dict[str, float] = {}
        self._started = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 4)

    def done(self) -> dict[str, float]:
        total = round(time.perf_counter() - self._started, 4)
        logger.info("%s in %.3f s (%s)", self.what, total, ", ".join(f"{k} {v:.3f}" for k, v in self.seconds.items()))
        return {**self.seconds, "total": total}


def stage(watch: Stopwatch | None, name: str) -> AbstractContextManager[None]:
    """``watch.stage(name)``, or nothing when no one times the call."""
    return watch.stage(name) if watch is not None else nullcontext()
