"""Uncertainty scores per image, kept in a JSON file that the scoring process replaces atomically."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Score:
    """One image's uncertainty under one model version.

    Args:
        value: the ranking score (higher is more uncertain).
        model_version: identifies the weights that produced it; a score from other weights is stale.
        ts: when it was computed (seconds since the epoch).
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

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._cache: tuple[int, dict[str, Score]] | None = None

    def load(self) -> dict[str, Score]:
        with self._lock:
            try:
                mtime = self.path.stat().st_mtime_ns
            except FileNotFoundError:
                return {}
            if self._cache and self._cache[0] == mtime:
                return dict(self._cache[1])
            raw = json.loads(self.path.read_text())
            scores = {k: Score(**v) for k, v in raw.items()}
            self._cache = (mtime, scores)
            return dict(scores)

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
        scores = self.load()
        scores.update(new)
        _write_json(self.path, {k: asdict(v) for k, v in scores.items()})

    # Images the last scoring run could not score (unreadable, not a volume, constant), with the
    # reason, in a file beside the scores: strategies leave them out until a run scores them.
    @property
    def unusable_path(self) -> Path:
        return self.path.with_name(f"{self.path.stem}.unusable.json")

    def unusable(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.unusable_path.read_text()))
        except FileNotFoundError:
            return {}

    def set_unusable(self, reasons: dict[str, str]) -> None:
        _write_json(self.unusable_path, reasons)


def _write_json(path: Path, obj: object) -> None:
    """Replace ``path`` with ``obj`` as JSON through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
