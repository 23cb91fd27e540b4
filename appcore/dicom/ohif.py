"""Serve the project's OHIF configuration in place of the one inside the monailabel wheel."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

CONFIG = Path(__file__).resolve().parents[2] / "viewers_config" / "ohif" / "app-config.js"


def serve_ohif_config(config: Path = CONFIG) -> bool:
    """Answer ``GET /ohif/app-config.js`` with ``config`` in the running MONAI Label server.

    MONAI Label serves OHIF from the wheel's static folder and has no setting for its configuration;
    the route is put first so that it wins over ``/ohif/{path}``. Outside the server process (a
    training child, a test building the app in-process) there is no server and nothing is done.
    Returns whether the route is in place.
    """
    server = sys.modules.get("monailabel.app")
    if server is None or not hasattr(server, "app"):
        return False
    if not config.is_file():
        raise FileNotFoundError(f"OHIF configuration {config} is missing")
    from starlette.responses import FileResponse
    from starlette.routing import Route

    routes = server.app.router.routes
    if any(getattr(r, "path", None) == "/ohif/app-config.js" for r in routes):
        return True

    async def app_config(request: object) -> FileResponse:
        return FileResponse(config, media_type="application/javascript", headers={"Cache-Control": "no-cache"})

    routes.insert(0, Route("/ohif/app-config.js", app_config, methods=["GET"]))
    logger.info("OHIF at /ohif/ uses %s", config)
    return True
