"""Requests that web pages of other sites make through a clinician's browser, refused at the server's door.

MONAI Label (0.8.5) answers every origin with CORS and credentials (``allow_origins=["*"]`` and
``allow_credentials=True`` echo the page's ``Origin``), so any web page a clinician opens could read
images and the labelled dataset, delete labels, start trainings or upload weights. Here:

- CORS is off unless origins are listed (``--conf cors_origins``, or MONAI Label's
  ``MONAI_LABEL_CORS_ORIGINS``): our own ``/ohif/`` is served by this server and needs none. A
  listed origin gets CORS without credentials; no origin is reflected.
- A request that changes something (POST, PUT, DELETE, PATCH) or opens a WebSocket is refused (403)
  when its ``Origin`` is another site's (or ``null``) and not listed, or when the browser marks it
  ``Sec-Fetch-Site: cross-site``: CORS alone lets a form post through without asking first.
- DNS rebinding (a page whose own host name resolves to 127.0.0.1 is same-origin with the server):
  a request that arrives on a loopback address must name a loopback host (``localhost``,
  ``*.localhost``), an IP address, or a host listed in ``--conf allowed_hosts`` (421 otherwise).
  With ``allowed_hosts`` set, that holds on every address.

3D Slicer, QuPath, curl and other native clients send no ``Origin`` and are not affected.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from appcore.errors import RequestError, forbidden

logger = logging.getLogger(__name__)

STATE_CHANGING = frozenset({"POST", "PUT", "DELETE", "PATCH"})
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normal_origin(text: str) -> str:
    """``text`` as a browser writes an ``Origin``: ``scheme://host[:port]``, lower case, without a
    default port or a trailing ``/``.

    Raises:
        ValueError: ``text`` is not an http(s) origin (a path, a query, ``*`` or no host).
    """
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"expected an origin such as https://viewer.example.org:8443, got {text!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"expected an origin such as https://viewer.example.org:8443, got {text!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"expected an origin with a port number between 0 and 65535, got {text!r}") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + ("" if port in (None, _DEFAULT_PORTS[parts.scheme]) else f":{port}")


def normal_host(text: str) -> str:
    """A host name for ``--conf allowed_hosts``, lower case.

    Raises:
        ValueError: ``text`` holds a scheme, a port, a path or characters no host name has.
    """
    host = text.strip().lower().rstrip(".")
    if not host or any(not (c.isalnum() or c in "-.") for c in host):
        raise ValueError(f"expected a host name such as labeling.example.org (no scheme or port), got {text!r}")
    return host


def _split_host(host: str) -> tuple[str, int | None] | None:
    """A ``Host`` header as (name, port); None when it cannot be read."""
    try:
        parts = urlsplit(f"//{host}")
        return (parts.hostname or "").rstrip("."), parts.port
    except ValueError:
        return None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class CrossSitePolicy:
    """Which web pages may drive the server, and by which host names it may be reached.

    Args:
        allowed_origins: origins (``normal_origin``) of other viewers' pages that may use the API,
            with CORS.
        allowed_hosts: host names (``normal_host``) the server may be reached by besides loopback
            names and IP addresses; when given, checked on every address, not only on loopback.
    """

    allowed_origins: frozenset[str] = frozenset()
    allowed_hosts: frozenset[str] = frozenset()

    @classmethod
    def from_lists(cls, origins: Iterable[str], hosts: Iterable[str]) -> CrossSitePolicy:
        return cls(frozenset(normal_origin(o) for o in origins), frozenset(normal_host(h) for h in hosts))

    def _host_allowed(self, name: str) -> bool:
        name = name.lower()
        return name == "localhost" or name.endswith(".localhost") or _is_ip(name) or name in self.allowed_hosts

    def refusal(self, scope: dict[str, Any]) -> RequestError | None:
        """Why the request of ``scope`` (ASGI, http or websocket) is refused, or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = headers.get("host")
        server = scope.get("server") or (None, None)
        if host is not None and (self.allowed_hosts or _is_loopback(str(server[0]))):
            split = _split_host(host)
            if split is None or not self._host_allowed(split[0]):
                hint = "" if self.allowed_hosts else f" at {server[0]}"
                return RequestError(
                    421,
                    f"This server{hint} is not reached by the host name {host!r}: a web page whose name points "
                    "at this machine (DNS rebinding) may be driving it. Open it as http://localhost:<port> or "
                    "by its IP address, or list the name with --conf allowed_hosts",
                )
        method = "WEBSOCKET" if scope["type"] == "websocket" else scope.get("method", "")
        if method not in STATE_CHANGING and method != "WEBSOCKET":
            return None
        origin = headers.get("origin")
        if origin is not None:
            if self._same_origin(origin, host) or self._listed(origin):
                return None
            return forbidden(
                f"Refused {method} {scope.get('path', '')} from the web page at {origin}: requests that change "
                "something are accepted only from this server's own pages and the origins listed in "
                "--conf cors_origins (3D Slicer, QuPath and other native clients send no Origin and are not "
                "affected)"
            )
        if headers.get("sec-fetch-site", "").lower() == "cross-site":
            return forbidden(
                f"Refused {method} {scope.get('path', '')}: the browser marks it as sent by another site's page "
                "(Sec-Fetch-Site: cross-site); requests that change something are accepted only from this "
                "server's own pages and the origins listed in --conf cors_origins"
            )
        return None

    def _listed(self, origin: str) -> bool:
        try:
            return normal_origin(origin) in self.allowed_origins
        except ValueError:
            return False

    @staticmethod
    def _same_origin(origin: str, host: str | None) -> bool:
        """Whether ``origin`` names the host and port the request was sent to (its ``Host``). The
        scheme is not compared: behind a TLS proxy the server sees http for an https page."""
        if host is None:
            return False
        try:
            parts = urlsplit(normal_origin(origin))
        except ValueError:
            return False  # "null" (a sandboxed frame, a file), or no http(s) origin
        split = _split_host(host)
        if split is None:
            return False
        default = _DEFAULT_PORTS[parts.scheme]
        return (parts.hostname, parts.port or default) == (split[0].lower(), split[1] or default)


def server_policy(cors_origins: Iterable[str], allowed_hosts: Iterable[str]) -> CrossSitePolicy:
    """The policy of ``--conf cors_origins`` and ``allowed_hosts``, with the origins of MONAI Label's
    ``MONAI_LABEL_CORS_ORIGINS`` added (MONAI Label allows every origin when that is empty; here
    none is then allowed)."""
    from monailabel.config import settings

    monai = [str(origin) for origin in settings.MONAI_LABEL_CORS_ORIGINS or ()]
    try:
        return CrossSitePolicy.from_lists([*cors_origins, *monai], allowed_hosts)
    except ValueError as e:
        raise ValueError(f"MONAI_LABEL_CORS_ORIGINS: {e}") from None


def _cors_layer(app: Any) -> tuple[Any, Any] | None:
    """The ``CORSMiddleware`` in the ASGI chain from ``app`` (following ``.app``) and the layer
    above it (None at the top), or None when there is none."""
    from starlette.middleware.cors import CORSMiddleware

    above, layer, seen = None, app, set()
    while layer is not None and id(layer) not in seen:
        seen.add(id(layer))
        if isinstance(layer, CORSMiddleware):
            return above, layer
        above, layer = layer, getattr(layer, "app", getattr(layer, "inner", None))
    return None


def guard_cross_site(policy: CrossSitePolicy) -> bool:
    """Put ``policy`` in front of the running server's ASGI stack and replace MONAI Label's CORS.

    MONAI Label builds its ``CORSMiddleware`` (every origin, with credentials) into the FastAPI
    application before the app starts; it is taken out of the built stack here, or, with origins
    listed, replaced by one that allows those only, without credentials. Returns whether the
    server's stack was changed (False outside a server process).
    """
    from appcore.seam import server_stack, set_server_stack

    stack = server_stack()
    if stack is None:
        return False
    from starlette.middleware.cors import ALL_METHODS, CORSMiddleware
    from starlette.responses import JSONResponse

    found = _cors_layer(stack)
    if found is not None:
        above, cors = found
        inner = cors.app
        if policy.allowed_origins:
            inner = CORSMiddleware(
                inner, allow_origins=sorted(policy.allowed_origins), allow_methods=ALL_METHODS, allow_headers=["*"]
            )
        if above is None:
            stack = inner
        elif hasattr(above, "app"):
            above.app = inner
        else:
            above.inner = inner  # appcore.routes' body limit
    if isinstance(stack, _CrossSiteGuard):
        stack.policy = policy
    else:
        stack = _CrossSiteGuard(stack, policy, JSONResponse)
    set_server_stack(stack)
    logger.info(
        "CORS origins: %s; host names besides loopback and IP addresses: %s",
        sorted(policy.allowed_origins) or "none (same origin only)",
        sorted(policy.allowed_hosts) or "none",
    )
    return True


class _CrossSiteGuard:
    """The ASGI layer that answers a request ``policy`` refuses."""

    def __init__(self, app: Any, policy: CrossSitePolicy, response: Any) -> None:
        self.app, self.policy, self._response = app, policy, response

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            error = self.policy.refusal(scope)
            if error is not None:
                logger.warning("Refused %s %s: %s", scope.get("method", "WEBSOCKET"), scope.get("path"), error.detail)
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 1008, "reason": "cross-site"})
                response = self._response({"detail": error.detail}, status_code=error.status_code)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
