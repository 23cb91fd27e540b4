"""Serve OHIF 3.13 (``make ohif`` installs its built ``dist/``) at ``/ohif/``, with the labeling panel.

MONAI Label serves the OHIF inside its wheel at ``/ohif/`` (an old OHIF whose MONAI Label mode cannot
save a label) and has no setting for it. Here routes placed first in its router answer instead:

- ``/ohif/app-config.js``: ``viewers_config/ohif/app-config.js`` (the data source is the server's
  DICOMweb proxy; the labeling extension and its panel in the segmentation mode).
- ``/ohif/labeling/<file>``: the labeling extension (``viewers_config/ohif/extension/``), a plain ES
  module OHIF loads with ``import()``; no build step.
- ``/ohif/<path>``: a file of the dist, else ``index.html`` (a single-page app: its routes are paths).
  The dist is built to live at ``/``; ``index.html`` and the app bundle get ``/ohif/`` as their
  public path as they are served (the files on disk stay as npm packed them, sha-checked).

Every answer carries the cross-origin isolation headers (COOP ``same-origin``, COEP
``require-corp``) so that OHIF's volume viewports get ``SharedArrayBuffer``.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from appcore.seam import insert_first, server_app

logger = logging.getLogger(__name__)

VIEWERS = Path(__file__).resolve().parents[2] / "viewers_config" / "ohif"
CONFIG = VIEWERS / "app-config.js"
EXTENSION = VIEWERS / "extension"
# Where ``make ohif`` unpacks @ohif/app's dist (git-ignored); OHIF_DIST overrides it.
DIST = Path(os.environ.get("OHIF_DIST", VIEWERS / "dist"))
OHIF_VERSION = "3.13.2"
PREFIX = "/ohif/"
ISOLATION = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_EXTENSION_FILE = re.compile(r"[a-z][a-z0-9_-]*\.js")


def _rewritten(path: Path) -> bytes | None:
    """A top-level page, script or style sheet of the dist with ``/ohif/`` as its public path instead
    of ``/``; ``None`` where the file names no root path (served as it is)."""
    if path.suffix not in (".html", ".js", ".css"):
        return None
    return _rewrite_cached(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=64)
def _rewrite_cached(path: str, mtime_ns: int) -> bytes | None:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".html"):
        new = re.sub(r'(src|href)="/(?!/)', rf'\1="{PREFIX}', text)
        new = new.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{PREFIX}"')
    elif path.endswith(".css"):  # fonts
        new = re.sub(r"url\(/(?!/)", f"url({PREFIX}", text)
    else:  # webpack's runtime in the app bundle and in each worker bundle loads chunks from here
        new = text.replace('__webpack_require__.p = "/";', f'__webpack_require__.p = "{PREFIX}";')
    return new.encode("utf-8") if new != text else None


def dist_file(path: str, dist: Path = DIST) -> Path | None:
    """The dist file a path below ``/ohif/`` names, or ``None`` (a route of the app: index.html).
    A path that leaves the dist (``..``, a link out) names nothing."""
    if not path or path.endswith("/"):
        return None
    root = dist.resolve()
    candidate = (root / path).resolve()
    if root not in candidate.parents or not candidate.is_file():
        return None
    return candidate


def ohif_response(path: str, dist: Path = DIST) -> Any:
    """The answer to ``GET /ohif/<path>``."""
    from starlette.responses import FileResponse, PlainTextResponse, Response

    if not (dist / "index.html").is_file():
        return PlainTextResponse(
            f"OHIF {OHIF_VERSION} is not installed in {dist}: run `make ohif` (make serve does), then reload",
            status_code=503,
            headers=ISOLATION,
        )
    found = dist_file(path, dist)
    if found is None or found.name == "index.html":
        found = dist / "index.html"
    media = mimetypes.guess_type(found.name)[0] or "application/octet-stream"
    if found.suffix == ".wasm":
        media = "application/wasm"
    top_level = found.parent == dist.resolve() or found == dist / "index.html"
    changed = _rewritten(found) if top_level else None
    if changed is not None:
        cache = {"Cache-Control": "no-cache"} if found.suffix == ".html" else {}
        return Response(changed, media_type=media, headers={**ISOLATION, **cache})
    return FileResponse(found, media_type=media, headers=ISOLATION)


def serve_ohif(config: Path = CONFIG, extension: Path = EXTENSION) -> bool:
    """Place the ``/ohif/`` routes first in the running MONAI Label server (see the module's text).

    Outside the server process (a training child, a test building the app in-process) there is no
    server and nothing is done. Returns whether the routes are in place.
    """
    if server_app() is None:
        return False
    if not config.is_file():
        raise FileNotFoundError(f"OHIF configuration {config} is missing")
    from starlette.responses import FileResponse, PlainTextResponse
    from starlette.routing import Route

    async def app_config(request: Any) -> Any:
        return FileResponse(
            config, media_type="application/javascript", headers={**ISOLATION, "Cache-Control": "no-cache"}
        )

    async def extension_file(request: Any) -> Any:
        name = request.path_params["name"]
        found = extension / name
        if not _EXTENSION_FILE.fullmatch(name) or not found.is_file():
            return PlainTextResponse(f"No labeling extension file {name!r}", status_code=404, headers=ISOLATION)
        return FileResponse(
            found, media_type="application/javascript", headers={**ISOLATION, "Cache-Control": "no-cache"}
        )

    async def viewer(request: Any) -> Any:
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(ohif_response, request.path_params.get("path", ""))

    placed = all(
        insert_first(route)
        for route in (
            Route("/ohif/{path:path}", viewer, methods=["GET", "HEAD"], name="ohif_viewer"),
            Route("/ohif/labeling/{name}", extension_file, methods=["GET", "HEAD"], name="ohif_extension"),
            Route("/ohif/app-config.js", app_config, methods=["GET", "HEAD"], name="ohif_app_config"),
        )
    )
    if placed:
        logger.info("OHIF %s at /ohif/ from %s, configured by %s", OHIF_VERSION, DIST, config)
    return placed


def as_requested_format(result: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """Rewrite an infer result's NIfTI label as NRRD when the request asks for ``result_extension: .nrrd``.

    MONAI Label's OHIF extension reads only NRRD (raw, uint8); the voxel order is kept ([column, row,
    slice] as the series was decoded), with the grid in LPS as NRRD viewers expect.
    """
    label = result.get("file") if isinstance(result, dict) else None
    if request.get("result_extension") != ".nrrd" or not label or not str(label).endswith((".nii", ".nii.gz")):
        return result
    import nibabel as nib
    import nrrd
    import numpy as np

    img = nib.load(label)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
        "encoding": "gzip" if request.get("result_compress") else "raw",
    }
    fd, out = tempfile.mkstemp(suffix=".nrrd")
    os.close(fd)
    nrrd.write(out, np.asarray(img.dataobj).astype(np.uint8), header, index_order="F")
    Path(label).unlink(missing_ok=True)
    return {**result, "file": out, "label": out if result.get("label") == label else result.get("label")}
