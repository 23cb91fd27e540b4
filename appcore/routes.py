"""Routes this project puts in front of MONAI Label's own, inside the running server process.

MONAI Label builds its FastAPI application before it creates the app and has no hook for extra
checks; routes can still be inserted at the front of the router's list, where Starlette tries them
first. Outside the server process (a training child, a test building the app in-process) there is no
server and nothing is inserted.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection
from typing import Any

from appcore.errors import RequestError

# Given a request's path parameters, why it is refused, or None to let MONAI Label's route answer.
Refusal = Callable[[dict[str, Any]], RequestError | None]

_REFUSAL_KEY = "appcore.refusal"


def insert_first(route: Any) -> bool:
    """Put ``route`` first in the running server's router unless a route of that name is there.

    Returns whether such a route is in place (False outside a server process).
    """
    server = sys.modules.get("monailabel.app")
    if server is None or not hasattr(server, "app"):
        return False
    routes = server.app.router.routes
    if not any(getattr(r, "name", None) == route.name for r in routes):
        routes.insert(0, route)
    return True


def refuse_early(path: str, methods: Collection[str], refusal: Refusal, name: str) -> bool:
    """Answer requests to ``path`` with the 4xx ``refusal`` gives, before MONAI Label's route sees them.

    MONAI Label starts a training or scoring for any name and reports the failure later in the
    task's status; a refusal here answers at once instead. Requests ``refusal`` accepts (it returns
    None) go on to MONAI Label's route unchanged. ``refusal`` runs while the request is routed, so
    it must be quick and must not change anything.
    """
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Match, Route

    async def refuse(request: Request) -> JSONResponse:
        error: RequestError = request.scope[_REFUSAL_KEY]
        return JSONResponse({"detail": error.detail}, status_code=error.status_code)

    class _Refusing(Route):
        def matches(self, scope: Any) -> tuple[Match, dict[str, Any]]:
            match, child = super().matches(scope)
            if match is not Match.FULL:
                return Match.NONE, {}
            error = refusal(child["path_params"])
            if error is None:
                return Match.NONE, {}
            return Match.FULL, {**child, _REFUSAL_KEY: error}

    return insert_first(_Refusing(path, refuse, methods=list(methods), name=name))
