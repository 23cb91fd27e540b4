"""The viewer's DICOMweb proxy (``/proxy/dicom/...``): DICOMweb reads only, without blocking the server.

One write is taken, never forwarded: a STOW-RS of one DICOM SEG (OHIF's Export > DICOM SEG > Save,
``POST .../studies``) is saved as a label by the server (``appcore.dicom.labeling.store_seg``), which
writes its own SEG to the PACS. OHIF then reads its SEG back by its own UIDs: where the PACS answers
404 for it, the proxy answers the bytes OHIF sent (``appcore.dicom.stow.ReceivedSegs``).

MONAI Label (0.8.5) forwards any path below ``/proxy/dicom/`` to the PACS, with the server's PACS
credentials: ``/proxy/dicom/wado/%2e%2e/system`` reached Orthanc's REST API (``requests`` removes
the dot segments), and the same door created and deleted patients (``tools/create-dicom``,
``tools/bulk-delete``). Here a request is forwarded only when it is a GET (or HEAD) of a DICOMweb
resource the viewer reads (QIDO-RS searches, WADO-RS studies, series, instances, metadata, frames,
rendered, thumbnail, bulk data), named by UIDs, frame numbers and tags only, in the request as sent
(``raw_path``: Starlette decodes ``%2F`` and ``%2e`` before the route sees the path). The query is
re-encoded parameter by parameter and only the ``Accept`` header is passed on. Anything else is a
4xx that says what is forwarded.

MONAI Label also calls the PACS with a blocking ``requests`` call inside its async endpoint and no
timeout: a PACS that hangs froze the whole server (measured: ``/info`` did not answer in 60 s while
one proxied call waited on a stopped Orthanc). Here the call runs in a worker thread with connect
and read timeouts, and a PACS that does not answer gets a 503 that names it.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode

import requests
from fastapi import HTTPException
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from appcore.dicom.stow import ACCEPTED, RECEIVED, multipart_instance, stow_target
from appcore.errors import RequestError, bad_request, method_not_allowed

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
PREFIX = "/proxy/dicom/"
# Upstream headers passed back to the viewer; the rest (cookies, authentication challenges, hop by
# hop headers, a body length requests has changed by decoding) stay between the server and the PACS.
KEPT_HEADERS = {"content-type", "cache-control", "etag", "last-modified"}
FORWARDED_METHODS = ("GET", "HEAD")

# The DICOMweb resources forwarded (PS3.18 10.4 to 10.6): UIDs are digits and dots (no empty
# component, so no "." or ".."), frame lists digits and commas, bulk data a path of tags and item
# numbers (Orthanc names it ``bulk``, the standard's examples ``bulkdata``).
_UID = r"\d{1,64}(?:\.\d{1,64}){0,63}"
_FRAMES = r"\d{1,9}(?:,\d{1,9}){0,255}"
_VIEWS = r"(?:metadata|rendered|thumbnail)"
_BULK = r"bulk(?:data)?(?:/[0-9A-Fa-f]{8}|/\d{1,9}){1,32}"
_INSTANCE = rf"instances/{_UID}(?:/{_VIEWS}|/frames/{_FRAMES}(?:/rendered|/thumbnail)?|/{_BULK})?"
_SERIES = rf"series/{_UID}(?:/{_VIEWS}|/instances|/{_INSTANCE})?"
_STUDY = rf"studies/{_UID}(?:/{_VIEWS}|/series|/instances|/{_SERIES})?"
DICOMWEB_PATH = re.compile(rf"(?:studies|series|instances|{_STUDY})")
# What a proxied path may hold as sent: no percent escapes, backslashes, ';' parameters or other signs.
_PLAIN = re.compile(r"[A-Za-z0-9.,/-]*")
_QUERY_KEY = re.compile(r"[A-Za-z0-9_.]{1,64}")

FORWARDED = (
    "The DICOMweb proxy forwards only GET (and HEAD) requests for DICOMweb resources: studies, series or "
    "instances searches, studies/{uid}[/series/{uid}[/instances/{uid}]] with /metadata, /rendered, "
    "/thumbnail, /frames/{n[,n...]}[/rendered|/thumbnail] or /bulkdata/{tag...}, UIDs written as digits "
    "and dots; a path with '..', percent escapes, backslashes, ';' or empty segments is refused"
)


def check_proxied(method: str, op: str, path: str, raw_path: str | None) -> None:
    """Refuse a proxy request that is not a DICOMweb read (``RequestError``: 405 or 400).

    Args:
        method: the HTTP method.
        op: ``qido``, ``wado``, ``stow`` or ``""`` (the route ``/proxy/dicom/{path}``).
        path: the path below the op, as the route decoded it.
        raw_path: the request's path as sent (``scope["raw_path"]``), percent escapes and all; None
            where the server gives none, and the decoded path alone is checked.
    """
    if (method not in FORWARDED_METHODS or op == "stow") and not stow_target(method, op, path)[0]:
        raise method_not_allowed(
            f"{method} /proxy/dicom/{op + '/' if op else ''}... is not forwarded: the viewer only reads from the "
            f"PACS (labels are saved with PUT /datastore/label, which stores them as DICOM SEG). {FORWARDED}. "
            f"{ACCEPTED}",
            ", ".join(FORWARDED_METHODS),
        )
    if raw_path is not None:
        sent = raw_path.partition(PREFIX)[2] if PREFIX in raw_path else None
        if sent is None or not _PLAIN.fullmatch(sent) or not sent.endswith(path):
            raise bad_request(f"{FORWARDED}; got {raw_path!r}")
    if not DICOMWEB_PATH.fullmatch(path):
        raise bad_request(f"{FORWARDED}; got {path!r}")


def forwarded_query(query: str) -> str:
    """``query`` re-encoded parameter by parameter: a parameter's value cannot end the query or add a
    path (``#``, ``?``, ``/`` are escaped), and a name must be a DICOM keyword, tag or QIDO/WADO
    parameter (letters, digits, ``_`` and ``.``), else a 400."""
    pairs = parse_qsl(query, keep_blank_values=True)
    for key, _ in pairs:
        if not _QUERY_KEY.fullmatch(key):
            raise bad_request(
                f"Query parameter {key!r} is not forwarded: names are DICOM keywords or tags and QIDO-RS/WADO-RS "
                "parameters (letters, digits, '_' and '.', at most 64)"
            )
    return urlencode(pairs)


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

    raw_path = request.scope.get("raw_path")
    try:
        check_proxied(request.method, op, path, raw_path.decode("latin-1") if raw_path is not None else None)
        is_store, study = stow_target(request.method, op, path)
        if is_store:  # OHIF's Export > DICOM SEG > Save: a label save, nothing forwarded
            from appcore.dicom.labeling import store_seg

            return await store_seg(request, op, study)
        query = forwarded_query(request.scope.get("query_string", b"").decode("latin-1"))
    except RequestError as e:
        logger.warning("DICOMweb proxy refused %s %s: %s", request.method, request.url.path, e.status_code)
        raise
    root = settings.MONAI_LABEL_STUDIES
    prefixes = {
        "qido": settings.MONAI_LABEL_QIDO_PREFIX,
        "wado": settings.MONAI_LABEL_WADO_PREFIX,
        "stow": settings.MONAI_LABEL_STOW_PREFIX,
    }
    url = upstream_url(root, op, path, prefixes)
    if query:
        url = f"{url}?{query}"
    user = settings.MONAI_LABEL_DICOMWEB_USERNAME
    auth = (user, settings.MONAI_LABEL_DICOMWEB_PASSWORD) if user else None
    headers = {"Accept": request.headers["accept"]} if "accept" in request.headers else {}
    timeout = (CONNECT_TIMEOUT_S, settings.MONAI_LABEL_DICOMWEB_PROXY_TIMEOUT)

    def forward() -> requests.Response:
        # No redirects: a PACS answers DICOMweb in place, and a redirect could lead elsewhere.
        return requests.request(request.method, url, headers=headers, auth=auth, timeout=timeout, allow_redirects=False)

    try:
        upstream = await run_in_threadpool(forward)
    except requests.RequestException as e:
        logger.warning("DICOMweb proxy: %s %s failed: %s", request.method, url, e)
        raise HTTPException(
            status_code=503, detail=f"The PACS at {root} did not answer the viewer's request ({type(e).__name__})"
        ) from None
    echoed = RECEIVED.recall(path) if upstream.status_code == 404 else None
    if echoed is not None:  # a SEG OHIF stored a moment ago, which the PACS holds as the server's SEG
        body, media_type = multipart_instance(echoed)
        return Response(content=body if request.method == "GET" else b"", media_type=media_type)
    kept = {k: v for k, v in upstream.headers.items() if k.lower() in KEPT_HEADERS}
    return Response(content=upstream.content, status_code=upstream.status_code, headers=kept)
