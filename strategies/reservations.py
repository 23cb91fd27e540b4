"""Reservations that keep concurrent annotators from being handed the same image."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence


class ReservationBook:
    """Images handed out in the last ``window_s`` seconds, and to whom.

    ``pick`` chooses among the free candidates and reserves the choice under one lock, so two
    concurrent requests can never both receive the same image within the window.

    Args:
        window_s: how long a handed-out image stays reserved; 0 disables reservations.
        clock: monotonic time source in seconds (injected for tests).
    """

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        self.window_s = window_s
        self._clock = clock
        self._held: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        for image, (until, _) in list(self._held.items()):
            if until <= now:
                del self._held[image]

    def reserved(self) -> dict[str, str]:
        """Currently reserved images and the client holding each."""
        with self._lock:
            self._expire(self._clock())
            return {image: client for image, (_, client) in self._held.items()}

    def release(self, image: str) -> None:
        with self._lock:
            self._held.pop(image, None)

    def pick(self, candidates: Sequence[str], choose: Callable[[list[str]], list[str]], client_id: str) -> list[str]:
        """Reserve and return ``choose(free candidates)`` for ``client_id``."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            free = [c for c in candidates if c not in self._held]
            chosen = choose(free) if free else []
            if self.window_s > 0:
                for image in chosen:
                    self._held[image] = (now + self.window_s, client_id)
            return chosen
