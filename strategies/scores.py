"""Uncertainty scores per image, kept in a JSON file that the scoring process replaces atomically."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from appcore.files import write_json

logger = logging.getLogger(__name__)


def _json_or_empty(path: Path) -> dict[str, Any]:
    """A store file's content as it is on disk now (read under ``ScoreStore._changing``), ``{}`` if absent."""
    return json.loads(path.read_text()) if path.exists() else {}


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
    """A small JSON file ``{image_id: Score}``; readers never see a half-written file."""

    # Seconds after a write during which the cache does not trust the file's stat (``_read``).
    RACY_S = 2.0

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple[int, ...], dict[str, Any]]] = {}  # file -> (its stat, parsed content)

    def _read(self, path: Path, parse: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """The file's content (``{}`` while there is none), parsed again only when the file changed:
        strategies read it on every next-sample request. A file written in the last ``RACY_S`` is
        read again whatever its stat says: two writes within one tick of a coarse clock (Linux before
        6.13, NFS) share an mtime, and a freed inode number is soon reused."""
        with self._lock:
            try:
                st = path.stat()
            except FileNotFoundError:
                return {}
            key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            cached = self._cache.get(path)
            racy = time.time() - st.st_mtime < self.RACY_S
            if cached is None or cached[0] != key or racy:
                cached = self._cache[path] = (key, parse(json.loads(path.read_text())))
            return dict(cached[1])

    @staticmethod
    def _scores(raw: dict[str, Any]) -> dict[str, Score]:
        return {k: Score(**v) for k, v in raw.items()}

    def load(self) -> dict[str, Score]:
        return self._read(self.path, self._scores)

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

    def _changing(self) -> FileLock:
        """Held while the files are read, changed and written back: a scoring run's process, the one
        a training rescores in at its end and the server (``forget``) may change them at once, and
        each would otherwise write back a copy without the others' changes."""
        return FileLock(str(self.path.with_name(f".{self.path.name}.lock")))

    def update(self, new: dict[str, Score]) -> None:
        """Store ``new`` scores, except those begun (``ts``) before their image's file changed."""
        with self._changing():
            forgotten = _json_or_empty(self.forgotten_path)
            stale = sorted(k for k, v in new.items() if v.ts < forgotten.get(k, float("-inf")))
            if stale:
                logger.info("Not storing the scores of %s: their files changed while they were scored", stale)
            scores = self._scores(_json_or_empty(self.path))  # as it is now, whatever a cache holds
            scores.update({k: v for k, v in new.items() if k not in stale})
            write_json(self.path, {k: asdict(v) for k, v in scores.items()})

    def forget(self, image_id: str) -> None:
        """Drop an image's score and unusable mark: its file was replaced or removed, so they describe
        another image. It is then unscored (ranked last, and scored by the next run). A score computed
        from the old file by a run still going (begun before now) is not taken afterwards (``update``)."""
        with self._changing():
            for path in (self.path, self.unusable_path, self.out_of_scope_path):
                content = _json_or_empty(path)
                if content.pop(image_id, None) is not None:
                    write_json(path, content)
                    if path == self.path:
                        logger.info("Dropped the score of %s: its file was replaced or removed", image_id)
            forgotten = _json_or_empty(self.forgotten_path)
            forgotten[image_id] = time.time()
            write_json(self.forgotten_path, forgotten)

    @property
    def forgotten_path(self) -> Path:
        """When each image's score was last dropped: scores computed before that are stale."""
        return self.path.with_name(f"{self.path.stem}.forgotten.json")

    # Images the last scoring run could not score (unreadable, not a volume, constant), with the
    # reason, in a file beside the scores: strategies leave them out until a run scores them.
    @property
    def unusable_path(self) -> Path:
        return self.path.with_name(f"{self.path.stem}.unusable.json")

    def unusable(self) -> dict[str, str]:
        return self._read(self.unusable_path, dict)

    def set_unusable(self, reasons: dict[str, str]) -> None:
        with self._changing():
            write_json(self.unusable_path, reasons)

    # Images another served model is for (``strategies.scoring.NotForThisModel``), with the reason:
    # not scored again until their file changes, and still handed out (unranked).
    @property
    def out_of_scope_path(self) -> Path:
        return self.path.with_name(f"{self.path.stem}.out_of_scope.json")

    def out_of_scope(self) -> dict[str, str]:
        return self._read(self.out_of_scope_path, dict)

    def set_out_of_scope(self, reasons: dict[str, str]) -> None:
        with self._changing():
            write_json(self.out_of_scope_path, reasons)
