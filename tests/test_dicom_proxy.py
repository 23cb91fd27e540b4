"""The viewer's DICOMweb proxy: where a path goes, and a PACS that hangs does not stop the server."""

from __future__ import annotations

import asyncio
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.responses import Response

from appcore.dicom import proxy
from appcore.dicom.proxy import upstream_url

PREFIXES = {"qido": None, "wado": "wado-rs", "stow": "/stow/"}


@pytest.mark.parametrize(
    ("op", "path", "url"),
    [
        ("qido", "studies", "http://pacs/dicom-web/studies"),
        ("wado", "studies/1/series/2", "http://pacs/dicom-web/wado-rs/studies/1/series/2"),
        ("qido", "studies/1/series/2/metadata", "http://pacs/dicom-web/wado-rs/studies/1/series/2/metadata"),
        ("stow", "studies", "http://pacs/dicom-web/stow/studies"),
        ("", "studies/1", "http://pacs/dicom-web/studies/1"),
    ],
)
def test_upstream_url(op: str, path: str, url: str) -> None:
    assert upstream_url("http://pacs/dicom-web/", op, path, PREFIXES) == url


class _Pacs(BaseHTTPRequestHandler):
    """QIDO at /studies echoing the query; /slow answers after ``delay`` seconds."""

    delay = 0.0

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.startswith("/slow"):
            time.sleep(self.delay)
        body = f'[{{"path": "{self.path}", "accept": "{self.headers.get("Accept")}"}}]'.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def pacs(monkeypatch: pytest.MonkeyPatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Pacs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_STUDIES", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_PROXY_TIMEOUT", 2.0)
    yield server
    server.shutdown()
    server.server_close()


def _app() -> FastAPI:
    """A FastAPI app with the proxy's route shape, as MONAI Label's server has it, and ``/info/``."""
    app = FastAPI()

    @app.get("/proxy/dicom/qido/{path:path}")
    async def route(request: Request, path: str) -> Response:
        return await proxy.proxy_dicom(request, "qido", path)

    @app.get("/info/")
    async def info() -> dict:
        return {"ok": True}

    return app


def test_the_query_and_accept_header_reach_the_pacs(pacs) -> None:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app()), base_url="http://server") as client:
            return await client.get(
                "/proxy/dicom/qido/studies", params={"PatientID": "ct_abdomen"}, headers={"Accept": "application/json"}
            )

    r = asyncio.run(go())
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json"
    assert r.json() == [{"path": "/studies?PatientID=ct_abdomen", "accept": "application/json"}]


def test_a_slow_pacs_does_not_hold_up_other_requests_and_a_silent_one_is_a_503(pacs) -> None:
    _Pacs.delay = 3.0  # longer than the 2 s read timeout set above

    async def go() -> tuple[httpx.Response, float, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app()), base_url="http://server") as client:
            started = time.perf_counter()
            slow = asyncio.create_task(client.get("/proxy/dicom/qido/slow"))
            await asyncio.sleep(0.3)  # the proxied call is under way
            info = await client.get("/info/")
            return info, time.perf_counter() - started, await slow

    info, seconds, slow = asyncio.run(go())
    assert info.status_code == 200 and seconds < 1.5, f"/info waited {seconds:.1f} s for the PACS"
    assert slow.status_code == 503 and "did not answer" in slow.json()["detail"]
