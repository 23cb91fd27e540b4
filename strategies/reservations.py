"""Reservations that keep concurrent annotators from being handed the same image."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from appcore.files import write_json
from appcore.projectdb import ProjectDB

logger = logging.getLogger(__name__)


class ReservationBook:
    """Images handed out in the last ``window_s`` seconds, and to whom.

    ``pick`` chooses among the free candidates and reserves the choice under one lock, so two
    concurrent requests can never both receive the same image within the window.

    Args:
        window_s: how long a handed-out image stays reserved; 0 disables reservations.
        clock: time source in seconds since the epoch (injected for tests).
        path: a JSON file that keeps the reservations across a server restart (written after each
            change, read at start); ``None`` keeps them in memory only. With ``db``: the JSON file of
            an older server, whose reservations are moved into the database at first use (the file
            is then renamed ``<name>.migrated``).
        db: the project database (``appcore.projectdb``) that keeps the reservations instead of
            ``path``: every process on the model folder (several servers included) then shares
            them, and a pick is one write transaction, so no two processes hand out one image.
        max_pick: the most items one request may be handed (and so hold), ``None`` for no limit; a
            request for more is refused (``strategies.ranked.request_k``) rather than letting one
            client reserve every image for ``window_s``.
    """

    def __init__(
        self,
        window_s: float,
        clock: Callable[[], float] = time.time,
        path: Path | str | None = None,
        max_pick: int | None = None,
        db: ProjectDB | None = None,
    ) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        if max_pick is not None and max_pick < 1:
            raise ValueError(f"max_pick must be >= 1, got {max_pick}")
        self.window_s = window_s
        self.max_pick = max_pick
        self._clock = clock
        self._path = Path(path) if path is not None else None
        self._db = db
        self._migrated = False
        self._held: dict[str, tuple[float, str]] = {} if db is not None else self._load()
        self._lock = threading.Lock()

    def _load(self) -> dict[str, tuple[float, str]]:
        if self._path is None or not self._path.exists():
            return {}
        try:
            raw = json.loads(self._path.read_text())
            held = {str(image): (float(until), str(client)) for image, (until, client) in raw.items()}
        except (ValueError, TypeError, AttributeError) as e:  # a damaged file: start without reservations
            logger.warning("Ignoring the reservations in %s, which cannot be read: %s", self._path, e)
            return {}
        now = self._clock()
        return {image: entry for image, entry in held.items() if entry[0] > now}

    def _save(self) -> None:
        if self._path is not None:
            write_json(self._path, {image: [until, client] for image, (until, client) in self._held.items()})

    def _expire(self, now: float) -> None:
        for image, (until, _) in list(self._held.items()):
            if until <= now:
                del self._held[image]

    # -- in the project database ------------------------------------------------------------------
    def _database(self) -> ProjectDB:
        """The database (a book made with one), once the JSON file of an older server has been moved into it."""
        if self._db is None:
            raise RuntimeError("This reservation book keeps its reservations in memory or a JSON file")
        if not self._migrated:
            if self._path is not None and self._path.exists():
                held = self._load()
                with self._db.transaction() as c:
                    c.executemany(
                        "INSERT INTO reservations (item, until, client) VALUES (?, ?, ?) ON CONFLICT (item) DO NOTHING",
                        [(item, until, client) for item, (until, client) in held.items()],
                    )
                with contextlib.suppress(FileNotFoundError):  # another process moved it first
                    self._path.rename(self._path.with_name(self._path.name + ".migrated"))
                logger.info("Reservations of %s moved into %s (%d held)", self._path.name, self._db.where, len(held))
            self._migrated = True
        return self._db

    def _db_reserved(self) -> dict[str, str]:
        rows = self._database().query("SELECT item, client FROM reservations WHERE until > ?", (self._clock(),))
        return {r["item"]: r["client"] for r in rows}

    def _db_pick(
        self, candidates: Sequence[str], choose: Callable[[list[str]], list[str]], client_id: str
    ) -> list[str]:
        with self._database().transaction() as c:  # the write lock first: another process waits here
            now = self._clock()
            c.execute("DELETE FROM reservations WHERE until <= ?", (now,))
            held = {r["item"] for r in c.execute("SELECT item FROM reservations")}
            free = [x for x in candidates if x not in held]
            chosen = choose(free) if free else []
            if self.window_s > 0 and chosen:
                c.executemany(
                    "INSERT INTO reservations (item, until, client) VALUES (?, ?, ?) "
                    "ON CONFLICT (item) DO UPDATE SET until = excluded.until, client = excluded.client",
                    [(item, now + self.window_s, client_id) for item in chosen],
                )
            return chosen

    def reserved(self) -> dict[str, str]:
        """Currently reserved images and the client holding each."""
        if self._db is not None:
            return self._db_reserved()
        with self._lock:
            self._expire(self._clock())
            return {image: client for image, (_, client) in self._held.items()}

    def release(self, image: str) -> None:
        if self._db is not None:
            with self._database().transaction() as c:
                c.execute("DELETE FROM reservations WHERE item = ?", (image,))
            return
        with self._lock:
            if self._held.pop(image, None) is not None:
                self._save()

    def pick(self, candidates: Sequence[str], choose: Callable[[list[str]], list[str]], client_id: str) -> list[str]:
        """Reserve and return ``choose(free candidates)`` for ``client_id``."""
        if self._db is not None:
            with self._lock:  # one transaction at a time from this process's threads
                return self._db_pick(candidates, choose, client_id)
        with self._lock:
            now = self._clock()
            self._expire(now)
            free = [c for c in candidates if c not in self._held]
            chosen = choose(free) if free else []
            if self.window_s > 0 and chosen:
                for image in chosen:
                    self._held[image] = (now + self.window_s, client_id)
                self._save()
            return chosen
