"""Every publish of a model's weights kept as a numbered version, one of which is served.

A model's versions live in ``<model_dir>/versions/<model>/``: ``<n>.pt`` (the weights) and
``<n>.json`` (the record: when, who, from which labels, with which validation figures, started from
which version), and ``state.json`` (which version is served). Version 0 is the shipped weights,
which live with the code and are never removed. The served weights stay where infer reads them
(``published``, e.g. ``apps/radiology/model/<model>.pt``): serving a version copies its file beside
that path and renames it into place, so infer sees the old weights or the new ones, never half a
file; serving version 0 removes the published file, as ``DELETE /model`` always did.

Every change holds a file lock (``.lock`` in the folder): a training run in a child process and an
upload or rollback in the server can publish at once without losing a version or a record.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock

from appcore.errors import not_found
from appcore.files import copy_replacing, write_json

logger = logging.getLogger(__name__)

SHIPPED = 0  # the version number of a model's shipped weights
DEFAULT_KEEP = 5  # --conf keep_versions


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class VersionStore:
    """The versions of one model's weights.

    Args:
        folder: where the versions are kept (``<model_dir>/versions/<model>``).
        model: the model's name, for messages.
        published: the file infer serves when it exists (the shipped weights are served otherwise).
        shipped: the shipped weights, version 0, or ``None`` for a model that ships none.
        keep: how many of the newest versions keep their weights file; the served one and the
            shipped weights are kept whatever their age. Older records stay (the history).
    """

    def __init__(self, folder: Path, model: str, published: Path, shipped: Path | None, *, keep: int = DEFAULT_KEEP):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.folder = Path(folder)
        self.model = model
        self.published = Path(published)
        self.shipped = Path(shipped) if shipped is not None and Path(shipped).exists() else None
        self.keep = keep

    # -- files ---------------------------------------------------------------------------------
    def weights_path(self, number: int) -> Path:
        return self.shipped if number == SHIPPED and self.shipped else self.folder / f"{number}.pt"

    def _record_path(self, number: int) -> Path:
        return self.folder / f"{number}.json"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.folder / ".lock")):
            yield

    def _state(self) -> dict[str, Any]:
        path = self.folder / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _write_state(self, served: int | None, last: int) -> None:
        stamp = self.published.stat().st_mtime_ns if self.published.exists() else None
        write_json(self.folder / "state.json", {"served": served, "last": last, "published_mtime_ns": stamp})

    def _numbers(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(p.stem) for p in self.folder.glob("*.json") if p.stem.isdigit())

    def _read_record(self, number: int) -> dict[str, Any]:
        return json.loads(self._record_path(number).read_text())

    # -- reading -------------------------------------------------------------------------------
    def shipped_record(self) -> dict[str, Any] | None:
        if self.shipped is None:
            return None
        return {
            "version": SHIPPED,
            "source": "shipped",
            "published_at": None,
            "started_by": None,
            "parent": None,
            "weights": str(self.shipped),
            "weights_kept": True,
        }

    def served_version(self) -> int | None:
        """The version infer serves now: the published file's, else 0 (shipped), else ``None``.

        A published file that the records do not describe (written before versions were kept, or by
        hand) is taken in as a version of its own at the next change; until then it reads as ``None``.
        """
        try:
            stamp = self.published.stat().st_mtime_ns
        except FileNotFoundError:  # never published, withdrawn, or the shipped weights served again
            return SHIPPED if self.shipped else None
        state = self._state()
        return state.get("served") if state.get("published_mtime_ns") == stamp else None

    def versions(self) -> list[dict[str, Any]]:
        """Every version's record, oldest first, each with ``served`` (bool) and ``weights_kept``."""
        served = self.served_version()
        records = [r for r in [self.shipped_record()] if r]
        for n in self._numbers():
            try:
                records.append(self._read_record(n))
            except (OSError, ValueError):  # a record being replaced reads whole after the rename; a
                continue  # foreign file in the folder is not a version
        for r in records:
            r["served"] = r["version"] == served
            r["weights_kept"] = self.weights_path(r["version"]).exists()
        return records

    def record(self, number: int) -> dict[str, Any]:
        """Version ``number``'s record; 404 (listing the versions) when unknown or its weights are gone."""
        found = next((r for r in self.versions() if r["version"] == number), None)
        if found is None or not found["weights_kept"]:
            kept = [r["version"] for r in self.versions() if r["weights_kept"]]
            why = "its weights were removed (only the newest --conf keep_versions are kept)" if found else "unknown"
            raise not_found(f"Model {self.model!r} has no version {number}: {why}; versions with weights: {kept}")
        return found

    def served_record(self) -> dict[str, Any]:
        """The served version's record (adopting a published file the records do not describe)."""
        if self.served_version() is None and self.published.exists():
            with self._locked():
                self._adopt()
        number = self.served_version()
        if number is None:
            raise not_found(f"Model {self.model!r} has no weights: no shipped weights and nothing published yet")
        return self.record(number)

    @contextmanager
    def reading(self, number: int) -> Iterator[Path]:
        """Version ``number``'s weights file, not removed (pruned) while the block reads it; 404 as ``record``."""
        with self._locked():
            self.record(number)
            yield self.weights_path(number)

    # -- changing ------------------------------------------------------------------------------
    def _adopt(self) -> int | None:
        """Under the lock: take in a published file the records do not describe as a new version."""
        if not self.published.exists() or self.served_version() is not None:
            return self.served_version()
        number = max([self._state().get("last", 0), *self._numbers()]) + 1
        copy_replacing(self.published, self.weights_path(number), later_mtime=True)
        record = {
            "version": number,
            "source": "found",
            "note": "published weights the records did not describe (published before versions were kept, or by hand)",
            "published_at": datetime.fromtimestamp(self.published.stat().st_mtime, UTC).isoformat(timespec="seconds"),
            "started_by": None,
            "parent": None,
        }
        write_json(self._record_path(number), record)
        self._write_state(number, number)
        logger.info("Model %s: took in the published weights as version %d", self.model, number)
        return number

    def publish(self, write: Callable[[Path], None], record: dict[str, Any]) -> dict[str, Any]:
        """A new version: ``write(path)`` writes its weights file, ``record`` describes it; it is then served.

        ``record`` gets ``version``, ``published_at``, ``replaced`` (the version served until now),
        ``size_bytes`` and, unless given, ``started_by`` ("anonymous") and ``parent`` (``None``: the
        version a training run started from, which it gives).
        """
        with self._locked():
            before = self._adopt()
            number = max([self._state().get("last", 0), *self._numbers()]) + 1
            target = self.weights_path(number)
            write(target)
            full = {
                **record,
                "version": number,
                "published_at": _now_iso(),
                "started_by": record.get("started_by") or "anonymous",
                "parent": record.get("parent"),
                "replaced": before,
                "size_bytes": target.stat().st_size,
            }
            write_json(self._record_path(number), full)
            copy_replacing(target, self.published, later_mtime=True)
            self._write_state(number, number)
            self._prune(number)
        logger.info("Model %s: published version %d (%s)", self.model, number, full.get("source"))
        return full

    def serve(self, number: int) -> dict[str, Any]:
        """Serve version ``number`` again (0: the shipped weights); 404 when it has no weights."""
        with self._locked():
            self._adopt()
            record = self.record(number)
            last = max([self._state().get("last", 0), *self._numbers()])
            if number == SHIPPED:
                self.published.unlink(missing_ok=True)
            else:
                copy_replacing(self.weights_path(number), self.published, later_mtime=True)
            self._write_state(number, last)
        logger.info("Model %s: now serves version %d", self.model, number)
        return {**record, "served": True}

    def withdraw(self) -> int | None:
        """The published weights no longer served (``DELETE /model``): the shipped ones are, or none.

        The withdrawn file is kept as ``<file>.<time>.deleted`` (as before versions were kept) and
        as its version. Returns the version withdrawn; 404 when nothing is published.
        """
        with self._locked():
            if not self.published.exists():
                raise not_found(
                    f"Model {self.model!r} has no published weights to delete: it serves its shipped weights or "
                    f"none. Only weights a training run or PUT /model/{self.model} published can be deleted"
                )
            withdrawn = self._adopt()
            last = max([self._state().get("last", 0), *self._numbers()])
            stamp = datetime.now().strftime("%Y%m%d_%H%M%S_%f")  # two deletes in one second keep both files
            os.replace(self.published, self.published.with_name(f"{self.published.name}.{stamp}.deleted"))
            self._write_state(SHIPPED if self.shipped else None, last)
        return withdrawn

    def _prune(self, served: int) -> None:
        """Remove the weights of all but the newest ``keep`` versions (and the served one)."""
        numbers = [n for n in self._numbers() if self.weights_path(n).exists()]
        for n in numbers[: -self.keep]:
            if n != served:
                self.weights_path(n).unlink(missing_ok=True)
                logger.info("Model %s: removed the weights of version %d (keep_versions %d)", self.model, n, self.keep)


def store_beside(published: Path, model: str, shipped: Path | None, *, keep: int = DEFAULT_KEEP) -> VersionStore:
    """The versions of the weights published at ``published``: in ``<its folder>/versions/<its stem>``
    (models that share a published file share its versions)."""
    published = Path(published)
    return VersionStore(published.parent / "versions" / published.stem, model, published, shipped, keep=keep)
