"""The routes of label history, review, tombstones and the audit log, in front of MONAI Label's own.

- ``GET /datastore/label/versions?image=ID&tag=final``: every version with ``version``, ``user``,
  time and review state, and the review decisions.
- ``GET /datastore/label?label=ID&tag=final&version=N``: that version's file; without ``version``,
  MONAI Label's answer (the current label).
- ``PUT /datastore/label/review?image=ID&tag=final&version=N&state=approved|rejected&comment=...``:
  a reviewer's decision (``version`` left out: the current one).
- ``POST /datastore/label/restore?image=ID&tag=final&version=N``: save version N again (a new version).
- ``POST /datastore/restore?image=ID[&tag=final]``: undo the last removal of the image (with its
  labels) or of its label; ``GET /datastore/tombstones[?image=ID]`` lists removals.
- ``GET /audit/?limit=100&before=ID``: the audit log of state-changing requests, newest first.

Each route depends on MONAI Label's ``RBAC`` for its role (reads: user; restore of a label:
annotator; review: reviewer; restore of an image and the audit log: admin), which passes every
request while MONAI Label's authentication is off.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Depends
from monailabel.config import settings as ml_settings
from monailabel.endpoints.user.auth import RBAC
from starlette.responses import FileResponse

from appcore import seam
from appcore.errors import unprocessable
from appcore.history import record_request
from appcore.identity import user as current_user
from appcore.projectdb import ProjectDB
from appcore.validation import check_image_id

logger = logging.getLogger(__name__)

USER = Depends(RBAC(ml_settings.MONAI_LABEL_AUTH_ROLE_USER))
ANNOTATOR = Depends(RBAC(ml_settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))
REVIEWER = Depends(RBAC(ml_settings.MONAI_LABEL_AUTH_ROLE_REVIEWER))
ADMIN = Depends(RBAC(ml_settings.MONAI_LABEL_AUTH_ROLE_ADMIN))

MAX_AUDIT = 1000  # entries one GET /audit/ answers at most


def _datastore() -> Any:
    from monailabel.interfaces.utils.app import app_instance

    store = app_instance().datastore()
    store._history()  # 404 for a datastore that keeps no history
    return store


def _checked(image: str, tag: str) -> None:
    check_image_id(image)
    check_image_id(tag, "Label tag")


def _version(version: int | None) -> None:
    if version is not None and version < 1:
        raise unprocessable(f"Label versions are numbered from 1, got version={version}")


def label_versions(image: str, tag: str = "final", user: Any = USER) -> dict[str, Any]:
    _checked(image, tag)
    store = _datastore()
    versions = store.history.versions(image, tag)
    if not versions:
        store._existing_label(image, tag)  # 404 for an unknown image or a label never saved
    current = store.history.latest(image, tag) if seam.local_index(store).label(image, tag) else None
    return {
        "image": image,
        "tag": tag,
        "current": current["version"] if current else None,
        "versions": versions,
        "reviews": store.history.reviews(image, tag),
    }


def download_label(label: str, tag: str, version: int | None = None, user: Any = USER) -> Any:
    if version is None:  # MONAI Label's answer, looked up now (a row of the seam table may wrap it)
        from monailabel.endpoints import datastore as endpoints

        return endpoints.download_label(label, tag)
    _checked(label, tag)
    _version(version)
    path = _datastore().history.file(label, tag, version)
    ext = "".join(path.suffixes)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{label}_{tag}_v{version}{ext}")


def review_label(
    image: str,
    state: str,
    tag: str = "final",
    version: int | None = None,
    comment: str | None = None,
    user: Any = REVIEWER,
) -> dict[str, Any]:
    _checked(image, tag)
    _version(version)
    return _datastore().history.review(image, tag, version, state, comment)


def restore_label(image: str, version: int, tag: str = "final", user: Any = ANNOTATOR) -> dict[str, Any]:
    _checked(image, tag)
    _version(version)
    return _datastore().restore_label(image, tag, version)


def restore_removed(image: str, tag: str | None = None, user: Any = ADMIN) -> dict[str, Any]:
    return _datastore().restore_removed(image, tag)


def tombstones(image: str | None = None, restored: bool = False, user: Any = USER) -> dict[str, Any]:
    if image is not None:
        check_image_id(image)
    return {"tombstones": _datastore().history.tombstones(image, restored=restored)}


def audit_log(limit: int = 100, before: int | None = None, user: Any = ADMIN) -> dict[str, Any]:
    if not 1 <= limit <= MAX_AUDIT:
        raise unprocessable(f"limit must be 1 to {MAX_AUDIT}, got {limit}; page on with before=<the last id>")
    return {"entries": _datastore().history.audit(limit, before)}


# (methods, path, endpoint, route name, why MONAI Label cannot do it): rows of ``appcore.seam.table``.
ROUTES: tuple[tuple[str, str, Any, str, str], ...] = (
    ("GET", "/datastore/label/versions", label_versions, "label_versions", "a second save replaced the first"),
    ("GET", "/datastore/label", download_label, "label_download_versioned", "serves one kept version"),
    ("PUT", "/datastore/label/review", review_label, "label_review", "MONAI Label has no review"),
    ("POST", "/datastore/label/restore", restore_label, "label_restore", "a replaced label could not come back"),
    ("POST", "/datastore/restore", restore_removed, "datastore_restore", "a removal deleted the files"),
    ("GET", "/datastore/tombstones", tombstones, "datastore_tombstones", "a removal left no trace"),
    ("GET", "/audit/", audit_log, "audit_log", "MONAI Label keeps no audit log"),
)


# Requests that change nothing, left out of the audit log.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_QUERY = 2000  # characters of a query string kept in the audit log


def audit_requests(db: ProjectDB) -> bool:
    """Record every state-changing request (not GET, HEAD or OPTIONS) in the audit log of ``db``: who
    (``appcore.identity``, read when the answer starts, so a user the auth layer set is seen),
    which client (``client_id``), what (method, path, query), when, and the result (status, time
    taken; 500 for a request that raised). Wraps the running server's ASGI stack outermost, so a
    request refused by any layer inside (413, 408, 401) is recorded too. Returns whether it did.
    """
    stack = seam.server_stack()
    if stack is None:
        return False
    if isinstance(stack, _AuditLog):
        stack.db = db
    else:
        seam.set_server_stack(_AuditLog(stack, db))
    return True


class _AuditLog:
    """The ASGI layer of ``audit_requests``."""

    def __init__(self, app: Any, db: ProjectDB) -> None:
        self.app, self.db = app, db

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in READ_METHODS:
            return await self.app(scope, receive, send)
        started = time.time()
        seen: dict[str, Any] = {"status": 500, "user": None, "recorded": False}

        async def noted(message: Any) -> None:
            if message.get("type") == "http.response.start":
                seen["status"] = message.get("status", 500)
                seen["user"] = current_user()
            elif message.get("type") == "http.response.body" and not message.get("more_body", False):
                await self._record(scope, started, seen)  # before the client has its answer: a read after sees it
            await send(message)

        try:
            await self.app(scope, receive, noted)
        finally:
            if not seen["recorded"]:
                await self._record(scope, started, seen)

    async def _record(self, scope: Any, started: float, seen: dict[str, Any]) -> None:
        from starlette.concurrency import run_in_threadpool

        seen["recorded"] = True
        who = seen["user"] or current_user()
        query = scope.get("query_string", b"").decode("latin-1")
        client = who.client or dict(parse_qsl(query)).get("client_id")
        entry = {
            "ts": started,
            "user": who.name,
            "client": client,
            "method": scope["method"],
            "path": scope["path"],
            "query": query[:MAX_QUERY],
            "status": seen["status"],
            "duration_ms": round((time.time() - started) * 1000, 1),
        }
        try:
            await run_in_threadpool(record_request, self.db, entry)
        except Exception:  # the request is answered; a full disk must not turn it into an error
            logger.exception("Audit log: could not record %s %s", entry["method"], entry["path"])
