"""The ``/model`` routes for weight versions, rollback and export, in front of MONAI Label's own.

- ``GET /model/{model}?format=raw|bundle&version=N``: the weights file (MONAI Label's answer) or a
  MONAI Bundle as a zip, of version N or of the served one.
- ``GET /model/{model}/versions``: every version's record and which one is served.
- ``PUT /model/{model}/serve?version=N``: serve version N again (0: the shipped weights), no restart.
- ``PUT /model/{model}?client_id=...``: upload weights (checked, ``RequestChecks.replace_weights``),
  recorded as started by the request's user, ``client_id`` kept as the client's name.

Who may call them is decided before they run, by ``appcore.auth`` (its role table: admin). Each
also depends on ``ADMIN``, MONAI Label's ``RBAC`` for its admin role, as MONAI Label's own
``/model`` routes do; it lets every request through while authentication is off.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from enum import StrEnum
from pathlib import Path
from typing import Any

from fastapi import Depends, UploadFile
from monailabel.config import settings as ml_settings
from monailabel.endpoints.user.auth import RBAC
from starlette.background import BackgroundTask
from starlette.responses import FileResponse

ADMIN = Depends(RBAC(ml_settings.MONAI_LABEL_AUTH_ROLE_ADMIN))


class ModelFormat(StrEnum):
    """What ``GET /model/{model}`` answers."""

    raw = "raw"  # the weights file, as MONAI Label answers it
    bundle = "bundle"  # a MONAI Bundle in the model-zoo layout, zipped


def _app() -> Any:
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def download(model: str, format: ModelFormat = ModelFormat.raw, version: int | None = None, user: Any = ADMIN) -> Any:
    app = _app()
    app._known_model(model)
    store = app.version_store(model)
    record = store.served_record() if version is None else store.record(version)
    if format is ModelFormat.raw:
        path = store.weights_path(record["version"])
        return FileResponse(path, media_type="application/octet-stream", filename=f"{model}_v{record['version']}.pt")
    work = Path(tempfile.mkdtemp(prefix="bundle."))
    try:
        folder = app.export_bundle(model, record["version"], work / model)
        archive = work / f"{model}_v{record['version']}.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    z.write(path, Path(model) / path.relative_to(folder))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    cleanup = BackgroundTask(shutil.rmtree, work, ignore_errors=True)
    return FileResponse(archive, media_type="application/zip", filename=archive.name, background=cleanup)


def versions(model: str, user: Any = ADMIN) -> dict[str, Any]:
    app = _app()
    app._known_model(model)
    store = app.version_store(model)
    return {"model": model, "served_version": store.served_version(), "versions": store.versions()}


def serve(model: str, version: int, user: Any = ADMIN) -> dict[str, Any]:
    return _app().serve_version(model, version)


def upload(model: str, file: UploadFile, client_id: str | None = None, user: Any = ADMIN) -> Any:
    return _app().replace_weights(model, file.file, client_id)
