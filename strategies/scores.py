"""Uncertainty scores per image, kept in the project database (``appcore.projectdb``).

The server's request threads (strategies read the scores, an upload forgets one) and its scoring
processes (a scoring run, the rescoring at the end of a training) change them at once, each in one
write transaction: no change is lost, and a process killed with ``kill -9`` leaves the last
committed state. The JSON files of an older server (``scores_<model>.json`` and its ``.unusable``
and ``.forgotten`` files) are moved in at first use and renamed ``<name>.migrated``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appcore.projectdb import Connection, ProjectDB, project_db

logger = logging.getLogger(__name__)


class NotForThisModel(ValueError):
    """Raised by a scorer for an image its model is not meant for but another served model is (an MR
    series under a CT model in a PACS serving both): the image is skipped and remembered apart from
    the unusable ones (``ScoreStore.out_of_scope``), so it is not scored again until its file
    changes, and it is still handed out (unranked, after the scored images) to be labelled."""


@dataclass(frozen=True)
class Score:
    """One image's uncertainty under one model version.

    Args:
        value: the ranking score (higher is more uncertain).
        model_version: identifies the weights that produced it; a score from other weights is stale.
        ts: when its computation began, before the image was read (seconds since the epoch).
        extra: further measures computed on the same passes (for example ``bald``, ``tta``, and
            ``embedding``, a list of floats).
    """

    value: float
    model_version: str
    ts: float
    extra: dict[str, Any]

    def measure(self, key: str | None) -> float | None:
        """The ranking value (``key`` ``None``) or one of the extra measures, ``None`` if absent."""
        if key is None:
            return self.value
        v = self.extra.get(key)
        return float(v) if isinstance(v, int | float) else None


class ScoreStore:
    """The scores of one ranking (``path``'s stem: ``scores_<al_model>``, ``scores_tiles``) in the project database.

    Args:
        path: names the ranking, and is where an older server kept it as JSON (moved in at first use).
        db: the project database; by default the SQLite file of ``path``'s folder (the model folder).

    Reads are cached and parsed again only after a change (a counter bumped by every write, read
    first): strategies read the scores on every next-sample request.
    """

    def __init__(self, path: Path | str, db: ProjectDB | None = None) -> None:
        self.path = Path(path)
        self.store = self.path.stem
        self._db = db
        self._lock = threading.Lock()
        self._migrated = False
        self._cache: dict[str, tuple[int, dict[str, Any]]] = {}  # table -> (change counter, content)

    # -- the database ------------------------------------------------------------------------------
    @property
    def db(self) -> ProjectDB:
        """The project database, once an older server's JSON files have been moved into it."""
        if self._db is None:
            self._db = project_db(self.path.parent)
        if not self._migrated:
            self._migrate(self._db)
            self._migrated = True
        return self._db

    def _legacy(self) -> list[Path]:
        return [p for p in (self.path, self.unusable_path, self.forgotten_path) if p.exists()]

    def _migrate(self, db: ProjectDB) -> None:
        if not self._legacy():
            return
        with db.transaction() as c:  # under the write lock: one process moves them, the others wait
            files = self._legacy()
            if not files:  # another thread or process moved them meanwhile
                return
            content: dict[Path, dict[str, Any]] = {}
            for p in files:
                try:
                    content[p] = dict(json.loads(p.read_text()))
                except (OSError, ValueError, TypeError) as e:  # a damaged file: what it held is rescored
                    logger.warning("Not moving %s into the project database, which cannot be read: %s", p, e)
            forgotten = _entries(content.get(self.forgotten_path, {}), float)
            self._forget(c, forgotten.items(), keep_newer=True)
            scores = _entries(content.get(self.path, {}), lambda v: Score(**v))
            self._put(c, scores, conflict="DO NOTHING")  # a score the database holds is newer
            c.executemany(
                "INSERT INTO unusable (store, image, reason) VALUES (?, ?, ?) ON CONFLICT (store, image) DO NOTHING",
                [(self.store, k, v) for k, v in _entries(content.get(self.unusable_path, {}), str).items()],
            )
            self._changed(c)
        for p in files:
            with contextlib.suppress(FileNotFoundError):  # another process moved it first
                p.rename(p.with_name(p.name + ".migrated"))
        logger.info("Scores of %s moved into %s (%s)", self.store, db.where, ", ".join(p.name for p in files))

    def _changed(self, c: Connection) -> None:
        c.execute(
            "INSERT INTO score_changes (store, n) VALUES (?, 1) "
            "ON CONFLICT (store) DO UPDATE SET n = score_changes.n + 1",
            (self.store,),
        )

    def _forget(self, c: Connection, items: Iterable[tuple[str, float]], keep_newer: bool = False) -> None:
        newer = "WHERE score_forgotten.ts < excluded.ts" if keep_newer else ""
        c.executemany(
            "INSERT INTO score_forgotten (store, image, ts) VALUES (?, ?, ?) "
            f"ON CONFLICT (store, image) DO UPDATE SET ts = excluded.ts {newer}",
            [(self.store, image, ts) for image, ts in items],
        )

    def _put(self, c: Connection, scores: dict[str, Score], conflict: str) -> None:
        """Store ``scores``, but none begun (``ts``) before its image's file changed (``forget``)."""
        forgotten = {
            r["image"]: r["ts"]
            for r in c.execute("SELECT image, ts FROM score_forgotten WHERE store = ?", (self.store,))
        }
        stale = sorted(k for k, v in scores.items() if v.ts < forgotten.get(k, -math.inf))
        if stale:
            logger.info("Not storing the scores of %s: their files changed while they were scored", stale)
        c.executemany(
            "INSERT INTO scores (store, image, value, model_version, ts, extra) VALUES (?, ?, ?, ?, ?, ?) "
            f"ON CONFLICT (store, image) {conflict}",
            [
                (self.store, k, None if math.isnan(v.value) else float(v.value), v.model_version, v.ts, _dumps(v.extra))
                for k, v in scores.items()
                if k not in stale
            ],
        )

    def _read(self, table: str) -> dict[str, Any]:
        """``scores`` as ``{image: Score}``, ``unusable`` or ``out_of_scope`` as ``{image: reason}``, parsed again only
        when the change counter moved (read before the rows: a change in between is read next time)."""
        db = self.db
        rows = db.query("SELECT n FROM score_changes WHERE store = ?", (self.store,))
        n = rows[0]["n"] if rows else 0
        with self._lock:
            cached = self._cache.get(table)
            if cached is not None and cached[0] == n:
                return dict(cached[1])
        if table == "scores":
            content: dict[str, Any] = {
                r["image"]: Score(
                    value=math.nan if r["value"] is None else r["value"],
                    model_version=r["model_version"],
                    ts=r["ts"],
                    extra=json.loads(r["extra"]),
                )
                for r in db.query("SELECT * FROM scores WHERE store = ?", (self.store,))
            }
        else:
            content = {
                r["image"]: r["reason"]
                for r in db.query(f"SELECT image, reason FROM {_REASONS[table]} WHERE store = ?", (self.store,))
            }
        with self._lock:
            self._cache[table] = (n, content)
        return dict(content)

    # -- the interface strategies and scoring use ----------------------------------------------------
    def load(self) -> dict[str, Score]:
        return self._read("scores")

    def values(self, model_version: str | None = None) -> dict[str, float]:
        """Ranking values, only those computed by ``model_version`` when it is given."""
        return {k: s.value for k, s in self.load().items() if model_version is None or s.model_version == model_version}

    def measure(self, key: str | None) -> dict[str, float]:
        """One measure of every scored image (the ranking value when ``key`` is ``None``)."""
        out = {k: s.measure(key) for k, s in self.load().items()}
        return {k: v for k, v in out.items() if v is not None}

    def embeddings(self) -> dict[str, list[float]]:
        """The feature vector of every image scored with one."""
        return {k: s.extra["embedding"] for k, s in self.load().items() if isinstance(s.extra.get("embedding"), list)}

    def update(self, new: dict[str, Score]) -> None:
        """Store ``new`` scores (replacing the images' older ones), except those begun (``ts``) before
        their image's file changed."""
        with self.db.transaction() as c:
            self._put(c, new, conflict=_REPLACE)
            self._changed(c)

    def forget(self, image_id: str) -> None:
        """Drop an image's score and unusable or out-of-scope mark: its file was replaced or removed, so they describe
        another image. It is then unscored (ranked last, and scored by the next run). A score computed
        from the old file by a run still going (begun before now) is not taken afterwards (``update``)."""
        with self.db.transaction() as c:
            dropped = c.execute(
                "DELETE FROM scores WHERE store = ? AND image = ? RETURNING image", (self.store, image_id)
            ).fetchall()
            for table in _REASONS.values():
                c.execute(f"DELETE FROM {table} WHERE store = ? AND image = ?", (self.store, image_id))
            self._forget(c, [(image_id, time.time())])
            self._changed(c)
        if dropped:
            logger.info("Dropped the score of %s: its file was replaced or removed", image_id)

    @property
    def forgotten_path(self) -> Path:
        """An older server's file of when each image's score was last dropped (moved into the database)."""
        return self.path.with_name(f"{self.path.stem}.forgotten.json")

    # Images the last scoring run could not score (unreadable, not a volume, constant), with the
    # reason: strategies leave them out until a run scores them.
    @property
    def unusable_path(self) -> Path:
        """An older server's file of the unusable images (moved into the database)."""
        return self.path.with_name(f"{self.path.stem}.unusable.json")

    def unusable(self) -> dict[str, str]:
        return self._read("unusable")

    def set_unusable(self, reasons: dict[str, str]) -> None:
        """The images the last scoring run could not score (replacing the previous run's)."""
        self._set_reasons("unusable", reasons)

    # Images another served model is for (``NotForThisModel``), with the reason:
    # not scored again until their file changes (``forget``), and still handed out (unranked).
    def out_of_scope(self) -> dict[str, str]:
        return self._read("out_of_scope")

    def set_out_of_scope(self, reasons: dict[str, str]) -> None:
        self._set_reasons("out_of_scope", reasons)

    def _set_reasons(self, kind: str, reasons: dict[str, str]) -> None:
        table = _REASONS[kind]
        with self.db.transaction() as c:
            c.execute(f"DELETE FROM {table} WHERE store = ?", (self.store,))
            c.executemany(
                f"INSERT INTO {table} (store, image, reason) VALUES (?, ?, ?)",
                [(self.store, k, str(v)) for k, v in reasons.items()],
            )
            self._changed(c)


# The tables of images a ranking leaves out, by what ``_read`` calls them (a fixed set: never a request's text).
_REASONS = {"unusable": "unusable", "out_of_scope": "out_of_scope"}


_REPLACE = (
    "DO UPDATE SET value = excluded.value, model_version = excluded.model_version, ts = excluded.ts, "
    "extra = excluded.extra"
)


def _entries(raw: dict[str, Any], parse: Any) -> dict[str, Any]:
    """``raw``'s entries that ``parse`` reads; one that does not (an older format, a hand edit) is
    left out with a warning, and its image is scored again by the next run."""
    out = {}
    for k, v in raw.items():
        try:
            out[str(k)] = parse(v)
        except (TypeError, ValueError) as e:
            logger.warning("Not moving the entry of %s into the project database: %s", k, e)
    return out


def _dumps(extra: dict[str, Any]) -> str:
    return json.dumps(extra, default=float)
