"""Serve the project's OHIF configuration in place of the one inside the monailabel wheel."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from appcore.seam import insert_first, server_app

logger = logging.getLogger(__name__)

CONFIG = Path(__file__).resolve().parents[2] / "viewers_config" / "ohif" / "app-config.js"


def serve_ohif_config(config: Path = CONFIG) -> bool:
    """Answer ``GET /ohif/app-config.js`` with ``config`` in the running MONAI Label server.

    MONAI Label serves OHIF from the wheel's static folder and has no setting for its configuration;
    the route is put first so that it wins over ``/ohif/{path}``. Outside the server process (a
    training child, a test building the app in-process) there is no server and nothing is done.
    Returns whether the route is in place.
    """
    if server_app() is None:
        return False
    if not config.is_file():
        raise FileNotFoundError(f"OHIF configuration {config} is missing")
    from starlette.responses import FileResponse
    from starlette.routing import Route

    async def app_config(request: object) -> FileResponse:
        return FileResponse(config, media_type="application/javascript", headers={"Cache-Control": "no-cache"})

    placed = insert_first(Route("/ohif/app-config.js", app_config, methods=["GET"], name="ohif_app_config"))
    if placed:
        logger.info("OHIF at /ohif/ uses %s", config)
    return placed


def as_requested_format(result: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """Rewrite an infer result's NIfTI label as NRRD when the request asks for ``result_extension: .nrrd``.

    OHIF's MONAI Label extension reads only NRRD (raw, uint8); the voxel order is kept ([column, row,
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
