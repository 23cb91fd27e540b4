"""The viewer's DICOMweb proxy (``/proxy/dicom/...``) without blocking the server.

MONAI Label (0.8.5) forwards each OHIF request to the PACS with a blocking ``requests`` call inside
its async endpoint and no timeout: while the PACS takes its time every other request to the server
waits, and a PACS that hangs freezes the whole server (measured: ``/info`` did not answer in 60 s
while one proxied call waited on a stopped Orthanc). Here the call runs in a worker thread with
connect and read timeouts, and a PACS that does not answer gets a 503 that names it.
"""

from __future__ import annotations

import logging
from typing import Any

import requests
from fastapi import HTTPException
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
# Headers that describe the upstream message, not the body forwarded (requests has decoded it).
HOP_HEADERS = {"connection", "content-encoding", "content-length", "keep-alive", "transfer-encoding"}


def upstream_url(root: str, op: str, path: str, prefixes: dict[str, str | None]) -> str:
    """The PACS URL a proxied path goes to: ``root`` (the studies URL), the prefix configured for
    ``op`` (``qido``, ``wado``, ``stow``; none for a bare path) and ``path``. Some OHIF versions
    ask QIDO for ``.../metadata``, which is a WADO resource."""
    if op == "qido" and path.endswith("metadata"):
        op = "wado"
    prefix = (prefixes.get(op) or "").strip("/")
    return "/".join(part for part in (root.rstrip("/"), prefix, path.lstrip("/")) if part)


async def proxy_dicom(request: Any, op: str, path: str) -> Response:
    """``monailabel.endpoints.proxy.proxy_dicom``, the function its four routes call."""
    from monailabel.config import settings

    root = settings.MONAI_LABEL_STUDIES
    prefixes = {
        "qido": settings.MONAI_LABEL_QIDO_PREFIX,
        "wado": settings.MONAI_LABEL_WADO_PREFIX,
        "stow": settings.MONAI_LABEL_STOW_PREFIX,
    }
    url = upstream_url(root, op, path, prefixes)
    if request.url.query:
        url = f"{url}?{request.url.query}"
    user = settings.MONAI_LABEL_DICOMWEB_USERNAME
    auth = (user, settings.MONAI_LABEL_DICOMWEB_PASSWORD) if user else None
    headers = {k: v for k, v in request.headers.items() if k.lower() in ("accept", "content-type")}
    body = await request.body() if request.method == "POST" else None
    timeout = (CONNECT_TIMEOUT_S, settings.MONAI_LABEL_DICOMWEB_PROXY_TIMEOUT)

    def forward() -> requests.Response:
        return requests.request(request.method, url, headers=headers, data=body, auth=auth, timeout=timeout)

    try:
        upstream = await run_in_threadpool(forward)
    except requests.RequestException as e:
        logger.warning("DICOMweb proxy: %s %s failed: %s", request.method, url, e)
        raise HTTPException(
            status_code=503, detail=f"The PACS at {root} did not answer the viewer's request ({type(e).__name__})"
        ) from None
    kept = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
    return Response(content=upstream.content, status_code=upstream.status_code, headers=kept)
