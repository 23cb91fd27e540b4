"""The viewer's DICOMweb proxy: where a path goes, what it refuses, and a PACS that hangs does not stop the server."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.responses import Response

from appcore.dicom import proxy
from appcore.dicom.proxy import check_proxied, forwarded_query, upstream_url
from appcore.errors import RequestError
from tests.conftest import requires_shared
from tests.e2e.servers import loaded_orthanc, monailabel_server, requires_dicom_data, requires_orthanc

SLOW = "9.9.9"  # the study the stand-in PACS is slow to answer
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
    """QIDO at /studies echoing the query; study ``SLOW`` answers after ``delay`` seconds. Every request that
    reaches it is recorded in ``seen`` (method, path and headers)."""

    delay = 0.0
    seen: list[tuple[str, str, dict[str, str]]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append((self.command, self.path, dict(self.headers)))
        if SLOW in self.path:
            time.sleep(self.delay)
        body = f'[{{"path": "{self.path}", "accept": "{self.headers.get("Accept")}"}}]'.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", "session=pacs")  # the PACS's own, not the viewer's
        self.send_header("WWW-Authenticate", 'Basic realm="pacs"')
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = do_DELETE = do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def pacs(monkeypatch: pytest.MonkeyPatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Pacs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_STUDIES", f"http://127.0.0.1:{server.server_address[1]}/dicom-web")
    monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_PROXY_TIMEOUT", 2.0)
    monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_USERNAME", None)
    monkeypatch.setattr(_Pacs, "seen", [])
    yield server
    server.shutdown()
    server.server_close()


def _app() -> FastAPI:
    """A FastAPI app with the proxy's routes, as MONAI Label's server has them, and ``/info/``."""
    app = FastAPI()
    for op in ("wado", "qido", "stow", ""):

        async def route(request: Request, path: str, op: str = op) -> Response:
            return await proxy.proxy_dicom(request, op, path)

        app.add_api_route(f"/proxy/dicom/{op}/{{path:path}}".replace("//", "/"), route, methods=["GET", "POST"])

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
    assert r.json() == [{"path": "/dicom-web/studies?PatientID=ct_abdomen", "accept": "application/json"}]


def test_a_slow_pacs_does_not_hold_up_other_requests_and_a_silent_one_is_a_503(pacs) -> None:
    _Pacs.delay = 3.0  # longer than the 2 s read timeout set above

    async def go() -> tuple[httpx.Response, float, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app()), base_url="http://server") as client:
            started = time.perf_counter()
            slow = asyncio.create_task(client.get(f"/proxy/dicom/qido/studies/{SLOW}"))
            await asyncio.sleep(0.3)  # the proxied call is under way
            info = await client.get("/info/")
            return info, time.perf_counter() - started, await slow

    info, seconds, slow = asyncio.run(go())
    assert info.status_code == 200 and seconds < 1.5, f"/info waited {seconds:.1f} s for the PACS"
    assert slow.status_code == 503 and "did not answer" in slow.json()["detail"]


STUDY = "studies/1.2.840.1/series/1.2.840.2/instances/1.2.840.3"


@pytest.mark.parametrize(
    "path",
    [
        "studies",
        "series",
        "instances",
        "studies/1.2.840.1",
        "studies/1.2.840.1/metadata",
        "studies/1.2.840.1/series",
        "studies/1.2.840.1/instances",
        "studies/1.2.840.1/series/1.2.840.2/metadata",
        "studies/1.2.840.1/series/1.2.840.2/instances",
        STUDY,
        f"{STUDY}/metadata",
        f"{STUDY}/rendered",
        f"{STUDY}/thumbnail",
        f"{STUDY}/frames/1",
        f"{STUDY}/frames/1,2,3/rendered",
        f"{STUDY}/bulk/7fe00010",  # Orthanc's BulkDataURI
        f"{STUDY}/bulkdata/0040a730/1/0040a160",
    ],
)
def test_dicomweb_reads_are_forwarded(path: str) -> None:
    for op in ("qido", "wado", ""):
        raw = f"/proxy/dicom/{op}/{path}".replace("//", "/")
        check_proxied("GET", op, path, raw)
        check_proxied("HEAD", op, path, None)


# (method, op, path as the route decoded it, raw path as sent or None, status)
REFUSED = [
    ("GET", "wado", "../system", "/proxy/dicom/wado/%2e%2e/system", 400),
    ("GET", "wado", "../system", "/proxy/dicom/wado/%2E%2e/system", 400),
    ("GET", "wado", "%2e%2e/system", "/proxy/dicom/wado/%252e%252e/system", 400),
    ("GET", "wado", "../system", "/proxy/dicom/wado/.%2e/system", 400),
    ("GET", "wado", "../system", "/proxy/dicom/wado/..%2fsystem", 400),
    ("GET", "wado", "studies/..\\..\\system", "/proxy/dicom/wado/studies/..%5c..%5csystem", 400),
    ("GET", "wado", "studies\\..\\system", "/proxy/dicom/wado/studies\\..\\system", 400),
    ("GET", "wado", "studies/1.2/..;/..;/system", "/proxy/dicom/wado/studies/1.2/..;/..;/system", 400),
    ("GET", "wado", "studies;x=1", "/proxy/dicom/wado/studies;x=1", 400),
    ("GET", "qido", "/system", "/proxy/dicom/qido//system", 400),
    ("GET", "wado", "studies//../system", "/proxy/dicom/wado/studies//../system", 400),
    ("GET", "wado", "studies/1.2/", "/proxy/dicom/wado/studies/1.2/", 400),
    ("GET", "wado", "studies/1..2", "/proxy/dicom/wado/studies/1..2", 400),
    ("GET", "wado", "studies/./series", "/proxy/dicom/wado/studies/./series", 400),
    ("GET", "wado", f"{STUDY}/frames/1/../../../../../../system", None, 400),
    ("GET", "qido", "STUDIES/../system", None, 400),
    ("GET", "", "tools/create-dicom", "/proxy/dicom/tools/create-dicom", 400),
    ("GET", "", "system", "/proxy/dicom/system", 400),
    ("GET", "", "patients", None, 400),
    ("GET", "wado", "studies", "/proxy/%64icom/wado/studies", 400),  # the prefix itself escaped
    ("GET", "wado", "studies/1.2/%2e%2e", "/proxy/dicom/wado/studies/1.2/%252e%252e", 400),
    ("POST", "", "tools/create-dicom", "/proxy/dicom/tools/create-dicom", 405),
    ("POST", "wado", "tools/bulk-delete", "/proxy/dicom/wado/tools/bulk-delete", 405),
    ("POST", "qido", "studies", "/proxy/dicom/qido/studies", 405),
    # a store is a POST of studies[/{uid}] only (a label save, appcore.dicom.stow); nothing else is written
    ("POST", "stow", "studies/1.2/series", "/proxy/dicom/stow/studies/1.2/series", 405),
    ("POST", "wado", "studies/1.2/series/1.3/instances", "/proxy/dicom/wado/studies/1.2/series/1.3/instances", 405),
    ("POST", "wado", "studies", "/proxy/dicom/wado/%73tudies", 400),  # checked on the raw path as reads are
    ("POST", "", "studies/1..2", "/proxy/dicom/studies/1..2", 405),
    ("GET", "stow", "studies", "/proxy/dicom/stow/studies", 405),
    ("DELETE", "wado", "studies/1.2", "/proxy/dicom/wado/studies/1.2", 405),
    ("PUT", "wado", "studies/1.2", "/proxy/dicom/wado/studies/1.2", 405),
]


@pytest.mark.parametrize(("method", "op", "path", "raw", "status"), REFUSED)
def test_anything_but_a_dicomweb_read_is_refused_saying_what_is_forwarded(
    method: str, op: str, path: str, raw: str | None, status: int
) -> None:
    with pytest.raises(RequestError, match=r"forwards only GET \(and HEAD\) requests for DICOMweb resources") as e:
        check_proxied(method, op, path, raw)
    assert e.value.status_code == status


@pytest.mark.parametrize(
    ("op", "path"), [("wado", "studies"), ("", "studies"), ("stow", "studies/1.2.3"), ("wado", "studies/1.2.3")]
)
def test_a_store_of_studies_passes_the_proxy_check(op: str, path: str) -> None:
    """OHIF's Export > DICOM SEG > Save (a STOW-RS to ``<wadoRoot>/studies``): read and saved as a label
    by the server (tests/appcore/dicom/test_labeling_stow.py), never forwarded."""
    check_proxied("POST", op, path, f"/proxy/dicom/{op + '/' if op else ''}{path}")


@pytest.mark.parametrize(
    ("query", "forwarded"),
    [
        ("PatientID=ct_abdomen&limit=101", "PatientID=ct_abdomen&limit=101"),
        ("includefield=00081030%2C00080060", "includefield=00081030%2C00080060"),
        ("PatientName=*abc*", "PatientName=%2Aabc%2A"),
        ("StudyDate=20200101-20201231&00100020=x", "StudyDate=20200101-20201231&00100020=x"),
        ("PatientID=1#/../../system", "PatientID=1%23%2F..%2F..%2Fsystem"),  # no fragment, no path
        ("PatientID=1%3F/../system", "PatientID=1%3F%2F..%2Fsystem"),
        ("", ""),
    ],
)
def test_the_query_is_re_encoded(query: str, forwarded: str) -> None:
    assert forwarded_query(query) == forwarded


@pytest.mark.parametrize("query", ["../../system=1", "a/b=1", "x%2F..=1", "a b=1", "k" * 65 + "=1"])
def test_a_query_parameter_name_that_is_no_dicom_name_is_refused(query: str) -> None:
    with pytest.raises(RequestError, match="is not forwarded: names are DICOM keywords or tags"):
        forwarded_query(query)


async def _asgi(app: FastAPI, method: str, target: str, headers: dict[str, str]) -> tuple[int, dict, bytes]:
    """``target`` sent to ``app`` as uvicorn passes it: ``raw_path`` as sent, ``path`` percent-decoded."""
    raw_path, _, query = target.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in {"host": "server", **headers}.items()],
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
    }
    sent = [{"type": "http.request", "body": b"{}", "more_body": False}]
    answer: dict = {"body": b""}

    async def receive() -> dict:
        return sent.pop(0) if sent else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        else:
            answer["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return answer["status"], answer["headers"], answer["body"]


ATTACKS = [
    ("GET", "/proxy/dicom/wado/%2e%2e/system"),
    ("GET", "/proxy/dicom/wado/%2E%2E/%2E%2E/system"),
    ("GET", "/proxy/dicom/wado/%252e%252e/system"),
    ("GET", "/proxy/dicom/wado/..%2Fsystem"),
    ("GET", "/proxy/dicom/qido/studies/..%5C..%5Csystem"),
    ("GET", "/proxy/dicom/wado/studies/..;/..;/system"),
    ("GET", "/proxy/dicom/qido//system"),
    ("GET", "/proxy/dicom/wado/../system"),
    ("GET", "/proxy/dicom/system"),
    ("GET", "/proxy/dicom/%2e%2e/system"),
    ("GET", "/proxy/dicom/qido/studies?../../system=1"),
    ("POST", "/proxy/dicom/tools/create-dicom"),
    ("POST", "/proxy/dicom/wado/%2e%2e/tools/create-dicom"),
    ("POST", "/proxy/dicom/wado/tools/bulk-delete"),
    ("POST", "/proxy/dicom/stow/studies/1.2/series"),
    ("POST", "/proxy/dicom/wado/studies/..%2F..%2Ftools/create-dicom"),
]


@pytest.mark.parametrize(("method", "target"), ATTACKS)
def test_a_refused_request_never_reaches_the_pacs(pacs, method: str, target: str) -> None:
    status, _, body = asyncio.run(_asgi(_app(), method, target, {}))
    assert status in (400, 405), body
    assert "forwards only GET" in json.loads(body)["detail"] or "not forwarded" in json.loads(body)["detail"]
    assert _Pacs.seen == []


@pytest.mark.parametrize(
    ("target", "status", "match"),
    [
        ("/proxy/dicom/stow/studies", 415, "The body is application/json"),
        ("/proxy/dicom/wado/studies/1.2.3", 415, "The body is application/json"),
        ("/proxy/dicom/studies?x=1", 422, r"Query parameter\(s\) \['x'\] are not taken by a store"),
    ],
)
def test_a_store_is_read_by_the_server_and_never_reaches_the_pacs(
    pacs, monkeypatch: pytest.MonkeyPatch, target: str, status: int, match: str
) -> None:
    """A STOW-RS (OHIF's export of a SEG) is the server's to read (tests/appcore/dicom/test_labeling_stow.py):
    a body that is no SEG is refused by it, and nothing goes to the PACS."""
    from appcore.dicom import labeling

    app = type("App", (), {"settings": type("Settings", (), {"max_upload_mb": 1})()})()
    monkeypatch.setattr(labeling.Labeling, "app", staticmethod(lambda: app))
    answer, _, body = asyncio.run(_asgi(_app(), "POST", target, {"Content-Type": "application/json"}))
    assert answer == status and re.search(match, json.loads(body)["detail"]), body
    assert _Pacs.seen == []


def test_only_the_accept_header_goes_to_the_pacs_and_only_safe_headers_come_back(pacs) -> None:
    headers = {
        "Accept": "application/dicom+json",
        "Authorization": "Bearer viewer-token",
        "Cookie": "session=viewer",
        "X-Forwarded-For": "10.0.0.1",
        "X-Orthanc-Custom": "1",
    }
    status, answer, _ = asyncio.run(_asgi(_app(), "GET", "/proxy/dicom/qido/studies?PatientID=x#/../y", headers))
    assert status == 200
    [(method, path, sent)] = _Pacs.seen
    assert (method, path) == ("GET", "/dicom-web/studies?PatientID=x%23%2F..%2Fy")
    sent = {k.lower() for k in sent}
    assert "accept" in sent and not sent & {"authorization", "cookie", "x-forwarded-for", "x-orthanc-custom"}
    assert "set-cookie" not in answer and "www-authenticate" not in answer
    assert answer["content-type"] == "application/dicom+json"


def test_the_pacs_credentials_go_only_with_forwarded_reads(pacs, monkeypatch: pytest.MonkeyPatch) -> None:
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_USERNAME", "orthanc")
    monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_PASSWORD", "secret")
    assert asyncio.run(_asgi(_app(), "GET", "/proxy/dicom/wado/%2e%2e/system", {}))[0] == 400
    assert asyncio.run(_asgi(_app(), "GET", f"/proxy/dicom/wado/{STUDY}/metadata", {}))[0] == 200
    [(_, path, sent)] = _Pacs.seen
    assert path == f"/dicom-web/{STUDY}/metadata" and sent["Authorization"].startswith("Basic ")


@pytest.fixture(scope="module")
def orthanc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, object]]:
    """A real Orthanc holding one MR series and the radiology server on it."""
    with loaded_orthanc(tmp_path_factory.mktemp("orthanc"), ("hippocampus_001",)) as pacs:
        conf = {"models": "hippocampus", "score_on_start": "false", "score_new_images": "false"}
        with monailabel_server(tmp_path_factory.mktemp("server"), pacs.orthanc.dicomweb_url, conf) as server:
            yield pacs, server


def _raw(url: str, method: str, target: str, body: bytes | None = None) -> tuple[int, bytes]:
    """``target`` sent byte for byte (no client normalises it)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        connection.putheader("Content-Length", str(len(body or b"")))
        connection.endheaders(body)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


@pytest.mark.slow
@requires_shared
@requires_dicom_data
@requires_orthanc
def test_orthanc_s_rest_api_is_not_reached_through_the_proxy(orthanc_server) -> None:
    import requests

    pacs, server = orthanc_server
    patients = requests.get(f"{pacs.orthanc.url}/patients", timeout=10).json()
    create = json.dumps({"Tags": {"PatientName": "INTRUDER", "PatientID": "intruder"}}).encode()
    for method, target, body in [
        ("GET", "/proxy/dicom/wado/%2e%2e/system", None),
        ("GET", "/proxy/dicom/qido/%2E%2E/%2E%2E/system", None),
        ("GET", "/proxy/dicom/wado/..%2f..%2fpatients", None),
        ("POST", "/proxy/dicom/wado/%2e%2e/%2e%2e/tools/create-dicom", create),
        ("POST", "/proxy/dicom/tools/create-dicom", create),
        ("POST", "/proxy/dicom/wado/%2e%2e/%2e%2e/tools/bulk-delete", json.dumps({"Resources": patients}).encode()),
    ]:
        status, answer = _raw(server.url, method, target, body)
        assert status in (400, 405), (target, answer)
        assert b"forwards only GET" in answer and b"Orthanc" not in answer, answer
    assert requests.get(f"{pacs.orthanc.url}/patients", timeout=10).json() == patients  # none made, none deleted

    # What OHIF reads still comes through: the study list, a series' metadata and its bulk data.
    status, answer = _raw(server.url, "GET", "/proxy/dicom/qido/studies?PatientID=hippocampus_001&limit=10")
    assert status == 200, answer
    study = json.loads(answer)[0]["0020000D"]["Value"][0]
    series = pacs.series["hippocampus_001"]
    status, answer = _raw(server.url, "GET", f"/proxy/dicom/qido/studies/{study}/series/{series}/metadata")
    assert status == 200, answer
    bulk = [v["BulkDataURI"] for v in json.loads(answer)[0].values() if "BulkDataURI" in v]
    assert bulk, answer
    for uri in bulk[:1]:  # OHIF resolves it from "studies/" on (bulkDataURI.relativeResolution)
        status, answer = _raw(server.url, "GET", "/proxy/dicom/wado/" + uri[uri.index("studies/") :])
        assert status == 200, answer
