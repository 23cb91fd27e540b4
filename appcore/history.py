"""Every saved label kept as a numbered version, with who saved it, its review state, and tombstones.

A label's versions live in ``<model folder>/label_history/<image>/<tag>/<n><ext>`` (the stored file
as the datastore wrote it) and in the ``label_versions`` table of the project database
(``appcore.projectdb``): user, client, time, how it came (``origin``), the proposal it started from,
its save parameters and its review state. Version numbers start at 1 and are never reused. A
version's file is written (through a temporary file and a rename) inside the transaction that
inserts its row, so a process killed at any point leaves either both or an unreferenced file that
the next version of that label overwrites: every listed version can be read.

Removing a label or an image keeps a tombstone (``tombstones``): the label's last version, or the
image's file with its info and its labels' versions, from which ``restore`` puts them back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from appcore.errors import RequestError, not_found, unprocessable
from appcore.files import copy_replacing
from appcore.identity import User, user
from appcore.projectdb import ProjectDB

logger = logging.getLogger(__name__)

HISTORY_DIR = "label_history"  # in the app's model folder
REMOVED_IMAGES = ".removed_images"  # in the history folder: no image id starts with a dot


class ReviewState(StrEnum):
    """Where a label version stands: every save is ``submitted``; a reviewer approves or rejects it."""

    submitted = "submitted"
    approved = "approved"
    rejected = "rejected"


class TrainOn(StrEnum):
    """Which ``final`` labels training uses (``--conf train_on``)."""

    submitted = "submitted"  # every label whose current version is not rejected
    approved = "approved"  # only labels whose current version a reviewer approved


class Origin(StrEnum):
    """How a version came to be."""

    save = "save"  # PUT /datastore/label (and every other save: sessions, batch infer)
    restore = "restore"  # POST /datastore/label/restore, or an image's restore
    pacs = "pacs"  # a SEG read from the PACS that this server had not stored (another tool's)
    found = "found"  # a label file found on disk that differs from its last recorded version
    migrated = "migrated"  # a label saved before history was kept (datastore.json), taken in at start


# Save-parameter key naming the inference proposal a label was corrected from.
PROPOSAL_KEY = "proposal"


def proposal_of(params: dict[str, Any]) -> tuple[str | None, int | None]:
    """The ``{"proposal": {"model": NAME, "version": N}}`` of a label's save parameters: the model and
    weights version (``served_version`` in ``/info``) whose infer the annotator started from.

    Raises:
        RequestError: 422 when it is not an object with a string ``model`` and a whole ``version`` >= 0.
    """
    proposal = params.get(PROPOSAL_KEY)
    if proposal is None:
        return None, None
    how = (
        f'Save parameter "{PROPOSAL_KEY}" names the infer the label started from: '
        '{"model": "<name>", "version": <served_version>}'
    )
    if not isinstance(proposal, dict) or set(proposal) - {"model", "version"}:
        raise unprocessable(f"{how}; got {proposal!r}")
    model, version = proposal.get("model"), proposal.get("version")
    if model is not None and not isinstance(model, str):
        raise unprocessable(f"{how}; its model is {model!r}")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
        raise unprocessable(f"{how}; its version is {version!r}")
    return model, version


# Info key of a version whose proposal the server noted (the last infer it served), not the client.
PROPOSAL_FROM = "proposal_from"


class ServedProposals:
    """The last proposal this server process served for each image to each user: the model and
    weights version of an infer (``/infer/<model>?image=<id>``, the OHIF panel's proposal or clicks).

    A save that names no proposal (3D Slicer's module and OHIF's own *Export* send none) records the
    last one served for its image to the same user (``appcore.identity``; with authentication off
    every caller is ``anonymous``, so the last one served to anyone), marked ``proposal_from:
    "server"``. Kept in memory, the ``keep`` most recent (user, image) pairs; a restart forgets them.
    """

    def __init__(self, keep: int = 4096) -> None:
        self.keep = keep
        self._last: OrderedDict[tuple[str, str], tuple[str, int | None]] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, image: str, model: str, version: int | None, who: User | None = None) -> None:
        """``model`` at weights ``version`` answered ``image`` to ``who`` (default: the request's user),
        unless inside :func:`not_served` (a proposal computed ahead, which nobody was shown yet)."""
        if not _SERVING.get():
            return
        key = ((who or user()).name, image)
        with self._lock:
            self._last[key] = (model, version)
            self._last.move_to_end(key)
            while len(self._last) > self.keep:
                self._last.popitem(last=False)

    def last(self, image: str, who: User) -> tuple[str, int | None] | None:
        with self._lock:
            return self._last.get((who.name, image))


_SERVING: ContextVar[bool] = ContextVar("serving_proposals", default=True)
SERVED = ServedProposals()


@contextlib.contextmanager
def not_served() -> Iterator[None]:
    """Infers inside are computed for later, not shown to anyone: ``SERVED`` does not note them."""
    token = _SERVING.set(False)
    try:
        yield
    finally:
        _SERVING.reset(token)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _suffix(path: str | Path) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(path).suffix.lower()


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _answer(row: Any) -> dict[str, Any]:
    """A version's row as the API answers it."""
    info = json.loads(row["info"])
    proposal = (
        {"model": row["proposal_model"], "version": row["proposal_version"]}
        if row["proposal_model"] is not None or row["proposal_version"] is not None
        else None
    )
    return {
        "version": row["version"],
        "user": row["user"],
        "client": row["client"],
        "ts": row["ts"],
        "time": _iso(row["ts"]),
        "origin": row["origin"],
        "restored_from": row["restored_from"],
        "proposal": proposal,
        # who named it: the client in its save parameters, or the server (the last infer it served)
        "proposal_from": (info.get(PROPOSAL_FROM) or "client") if proposal else None,
        "sha256": row["sha256"],
        "info": info,
        "review": {
            "state": row["state"],
            "reviewer": row["reviewer"],
            "time": _iso(row["reviewed_ts"]),
            "comment": row["comment"],
        },
    }


def _tombstone_answer(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "kind": row["kind"],
        "image": row["image"],
        "tag": row["tag"],
        "version": row["version"],
        "info": json.loads(row["info"]),
        "user": row["user"],
        "time": _iso(row["ts"]),
        "restored": _iso(row["restored_ts"]),
        "restored_by": row["restored_by"],
    }


class LabelHistory:
    """The versions of every label, their reviews and the tombstones of removed labels and images.

    Args:
        db: the project database.
        root: the folder the versions' and removed images' files are kept in.
    """

    def __init__(self, db: ProjectDB, root: str | Path) -> None:
        self.db = db
        self.root = Path(root)

    # -- versions ----------------------------------------------------------------------------------
    def record(
        self,
        image: str,
        tag: str,
        path: str | Path,
        *,
        info: dict[str, Any] | None = None,
        origin: Origin = Origin.save,
        restored_from: int | None = None,
        who: User | None = None,
        ts: float | None = None,
        unless_same: bool = False,
    ) -> dict[str, Any]:
        """Keep the stored label file ``path`` as the next version of ``image``'s ``tag`` label.

        ``who`` defaults to the request's user (``appcore.identity``); ``unless_same``: nothing is
        recorded when the file is the last version's content (a label found again on disk)."""
        who = who or user()
        info = {k: v for k, v in (info or {}).items() if k not in ("ts", "name", "path", "file_version", PROPOSAL_FROM)}
        try:
            model, version = proposal_of(info)
        except RequestError:  # checked when saved; an older server's record may hold anything
            model, version = None, None
        served = SERVED.last(image, who) if origin == Origin.save and PROPOSAL_KEY not in info else None
        if served is not None:
            (model, version), info[PROPOSAL_FROM] = served, "server"
        digest = sha256_of(path)
        client = who.client or (info.get("client_id") if isinstance(info.get("client_id"), str) else None)
        with self.db.transaction() as c:
            last = c.execute(
                "SELECT * FROM label_versions WHERE image = ? AND tag = ? ORDER BY version DESC LIMIT 1", (image, tag)
            ).fetchone()
            if unless_same and last is not None and last["sha256"] == digest:
                return _answer(last)
            number = 1 if last is None else last["version"] + 1
            relative = f"{image}/{tag}/{number}{_suffix(path)}"
            copy_replacing(path, self.root / relative)  # under the write lock: the number is ours
            c.execute(
                'INSERT INTO label_versions (image, tag, version, file, sha256, "user", client, ts, origin, '
                "restored_from, proposal_model, proposal_version, info) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    image,
                    tag,
                    number,
                    relative,
                    digest,
                    who.name,
                    client,
                    time.time() if ts is None else ts,
                    str(origin),
                    restored_from,
                    model,
                    version,
                    json.dumps(info, default=str),
                ),
            )
            row = c.execute(
                "SELECT * FROM label_versions WHERE image = ? AND tag = ? AND version = ?", (image, tag, number)
            ).fetchone()
        logger.info("Label %s/%s version %d kept (%s by %s)", tag, image, number, origin, who.name)
        return _answer(row)

    def versions(self, image: str, tag: str) -> list[dict[str, Any]]:
        """Every version of the label, oldest first (empty when it was never saved here)."""
        rows = self.db.query("SELECT * FROM label_versions WHERE image = ? AND tag = ? ORDER BY version", (image, tag))
        return [_answer(r) for r in rows]

    def latest(self, image: str, tag: str) -> dict[str, Any] | None:
        rows = self.db.query(
            "SELECT * FROM label_versions WHERE image = ? AND tag = ? ORDER BY version DESC LIMIT 1", (image, tag)
        )
        return _answer(rows[0]) if rows else None

    def _row(self, image: str, tag: str, version: int) -> Any:
        rows = self.db.query(
            "SELECT * FROM label_versions WHERE image = ? AND tag = ? AND version = ?", (image, tag, version)
        )
        if not rows:
            known = [
                r["version"]
                for r in self.db.query(
                    "SELECT version FROM label_versions WHERE image = ? AND tag = ? ORDER BY version", (image, tag)
                )
            ]
            raise not_found(
                f"The {tag!r} label of {image!r} has no version {version}; versions kept: {known or 'none'} "
                f"(GET /datastore/label/versions?image={image}&tag={tag})"
            )
        return rows[0]

    def version(self, image: str, tag: str, version: int) -> dict[str, Any]:
        """One version's record; 404 naming the versions kept."""
        return _answer(self._row(image, tag, version))

    def file(self, image: str, tag: str, version: int) -> Path:
        """The file of one version; 404 for an unknown version."""
        path = self.root / self._row(image, tag, version)["file"]
        if not path.is_file():
            raise not_found(f"The file of version {version} of the {tag!r} label of {image!r} is missing ({path.name})")
        return path

    # -- review ------------------------------------------------------------------------------------
    def review(
        self, image: str, tag: str, version: int | None, state: str, comment: str | None = None
    ) -> dict[str, Any]:
        """Approve or reject one version (the latest when ``version`` is None) as the request's user.

        Raises:
            RequestError: 422 for a state other than approved or rejected; 404 for an unknown version.
        """
        decisions = (ReviewState.approved.value, ReviewState.rejected.value)
        if state not in decisions:
            raise unprocessable(f"Review state must be one of {list(decisions)}, got {state!r}")
        if version is None:
            latest = self.latest(image, tag)
            if latest is None:
                raise not_found(f"The {tag!r} label of {image!r} has no version to review: save one first")
            version = latest["version"]
        self._row(image, tag, version)  # 404
        who, now = user(), time.time()
        with self.db.transaction() as c:
            c.execute(
                "UPDATE label_versions SET state = ?, reviewer = ?, reviewed_ts = ?, comment = ? "
                "WHERE image = ? AND tag = ? AND version = ?",
                (state, who.name, now, comment, image, tag, version),
            )
            c.execute(
                'INSERT INTO reviews (image, tag, version, state, "user", ts, comment) VALUES (?,?,?,?,?,?,?)',
                (image, tag, version, state, who.name, now, comment),
            )
        logger.info("Label %s/%s version %d %s by %s", tag, image, version, state, who.name)
        return self.version(image, tag, version)

    def reviews(self, image: str, tag: str) -> list[dict[str, Any]]:
        """Every review decision on the label, oldest first."""
        rows = self.db.query("SELECT * FROM reviews WHERE image = ? AND tag = ? ORDER BY id", (image, tag))
        return [
            {"version": r["version"], "state": r["state"], "user": r["user"], "time": _iso(r["ts"])}
            | {"comment": r["comment"]}
            for r in rows
        ]

    def not_for_training(self, image: str, train_on: TrainOn, tag: str = "final") -> str | None:
        """Why the current ``tag`` label of ``image`` is not training data under ``train_on``, or None."""
        latest = self.latest(image, tag)
        state = latest["review"]["state"] if latest else None
        if state == ReviewState.rejected:
            review = latest["review"]  # type: ignore[index]
            why = f": {review['comment']}" if review["comment"] else ""
            return f"its current version {latest['version']} was rejected by {review['reviewer']}{why}"  # type: ignore[index]
        if train_on is TrainOn.approved and state != ReviewState.approved:
            now = f"its current version {latest['version']} is {state}" if latest else "it has no recorded version"
            return (
                f"{now}, not approved (--conf train_on approved): a reviewer approves it with "
                f"PUT /datastore/label/review?image={image}&tag={tag}&state=approved"
            )
        return None

    # -- tombstones ----------------------------------------------------------------------------------
    def tombstone_label(self, image: str, tag: str, version: int | None) -> dict[str, Any]:
        """Note that ``image``'s ``tag`` label (last ``version``) was removed."""
        with self.db.transaction() as c:
            row = c.execute(
                "INSERT INTO tombstones (kind, image, tag, version, \"user\", ts) VALUES ('label', ?, ?, ?, ?, ?) "
                "RETURNING *",
                (image, tag, version, user().name, time.time()),
            ).fetchone()
        return _tombstone_answer(row)

    def tombstone_image(self, image: str, path: str | Path, info: dict[str, Any], labels: dict[str, int]) -> dict:
        """Keep a removed image's file (``path``), its info and its labels' last versions (tag: version)."""
        with self.db.transaction() as c:
            tombstone_id = c.execute(
                "INSERT INTO tombstones (kind, image, info, \"user\", ts) VALUES ('image', ?, ?, ?, ?) RETURNING id",
                (image, json.dumps({"info": info, "labels": labels}, default=str), user().name, time.time()),
            ).fetchone()["id"]
            relative = f"{REMOVED_IMAGES}/{tombstone_id}/{image}{_suffix(path)}"
            copy_replacing(path, self.root / relative)
            row = c.execute(
                "UPDATE tombstones SET file = ? WHERE id = ? RETURNING *", (relative, tombstone_id)
            ).fetchone()
        return _tombstone_answer(row)

    def tombstones(self, image: str | None = None, *, restored: bool = False) -> list[dict[str, Any]]:
        """Tombstones, newest first: of ``image`` (else all), the restored ones too with ``restored``."""
        sql = "SELECT * FROM tombstones WHERE (? IS NULL OR image = ?)"
        if not restored:
            sql += " AND restored_ts IS NULL"
        return [_tombstone_answer(r) for r in self.db.query(sql + " ORDER BY id DESC", (image, image))]

    def open_tombstone(self, image: str, tag: str | None) -> tuple[dict[str, Any], Path | None]:
        """The newest unrestored tombstone of ``image``'s ``tag`` label (of the image when ``tag`` is
        None), and the image's kept file; 404 when there is none."""
        kind = "image" if tag is None else "label"
        rows = self.db.query(
            "SELECT * FROM tombstones WHERE kind = ? AND image = ? AND (? IS NULL OR tag = ?) "
            "AND restored_ts IS NULL ORDER BY id DESC LIMIT 1",
            (kind, image, tag, tag),
        )
        if not rows:
            what = f"image {image!r}" if tag is None else f"the {tag!r} label of {image!r}"
            raise not_found(f"No removal of {what} to restore (GET /datastore/tombstones lists them)")
        row = rows[0]
        return _tombstone_answer(row), (self.root / row["file"]) if row["file"] else None

    def drop_tombstone(self, tombstone_id: int) -> None:
        """Forget a tombstone whose removal did not happen (its kept file stays, unreferenced)."""
        with self.db.transaction() as c:
            c.execute("DELETE FROM tombstones WHERE id = ?", (tombstone_id,))

    def mark_restored(self, ids: Iterable[int]) -> None:
        with self.db.transaction() as c:
            for i in ids:
                c.execute(
                    "UPDATE tombstones SET restored_ts = ?, restored_by = ? WHERE id = ?", (time.time(), user().name, i)
                )

    # -- audit ---------------------------------------------------------------------------------------
    def audit(self, limit: int = 100, before: int | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` audit entries (before entry id ``before``), newest first."""
        rows = self.db.query(
            "SELECT * FROM audit WHERE (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?", (before, before, limit)
        )
        return [{**dict(r), "time": _iso(r["ts"])} for r in rows]


def record_request(db: ProjectDB, entry: dict[str, Any]) -> None:
    """One audit entry: ``ts``, ``user``, ``client``, ``method``, ``path``, ``query``, ``status``, ``duration_ms``."""
    with db.transaction() as c:
        c.execute(
            'INSERT INTO audit (ts, "user", client, method, path, query, status, duration_ms) '
            "VALUES (:ts, :user, :client, :method, :path, :query, :status, :duration_ms)",
            entry,
        )
