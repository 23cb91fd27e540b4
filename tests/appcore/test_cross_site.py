"""Web pages of other sites cannot drive the server: no reflected CORS, no cross-site writes, no DNS rebinding."""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import nibabel as nib
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from appcore.cross_site import CrossSitePolicy, guard_cross_site, normal_host, normal_origin, server_policy
from appcore.settings import AppSettings
from radiology.registry import MODELS
from tests.conftest import HIPPO, requires_shared
from tests.servers import Server, one_case_server

EVIL = "https://evil.example"
VIEWER = "https://viewer.example.org:8443"


def _scope(
    method: str,
    headers: dict[str, str],
    *,
    server: tuple[str, int] = ("127.0.0.1", 8000),
    kind: str = "http",
) -> dict:
    headers = {"host": f"{server[0]}:{server[1]}", **headers}
    return {
        "type": kind,
        "method": method,
        "path": "/train/hippocampus",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "server": server,
    }


POLICY = CrossSitePolicy.from_lists([VIEWER], [])
HOSTS = CrossSitePolicy.from_lists([], ["labeling.example.org"])

# (policy, method, headers, server address the request came in on, status or None when let through)
CASES = [
    (POLICY, "POST", {}, ("127.0.0.1", 8000), None),  # 3D Slicer, curl, QuPath: no Origin
    (POLICY, "POST", {"origin": "http://127.0.0.1:8000"}, ("127.0.0.1", 8000), None),  # our own /ohif/
    (POLICY, "PUT", {"origin": "http://localhost:8000", "host": "localhost:8000"}, ("127.0.0.1", 8000), None),
    (POLICY, "DELETE", {"origin": "HTTP://LOCALHOST:8000", "host": "localhost:8000"}, ("127.0.0.1", 8000), None),
    (POLICY, "POST", {"origin": VIEWER}, ("127.0.0.1", 8000), None),  # listed
    (POLICY, "POST", {"origin": "https://viewer.example.org:8443/"}, ("127.0.0.1", 8000), None),
    (POLICY, "GET", {"origin": EVIL}, ("127.0.0.1", 8000), None),  # a read: CORS keeps the answer from the page
    (POLICY, "POST", {"origin": EVIL}, ("127.0.0.1", 8000), 403),
    (POLICY, "PUT", {"origin": EVIL}, ("127.0.0.1", 8000), 403),
    (POLICY, "DELETE", {"origin": EVIL}, ("127.0.0.1", 8000), 403),
    (POLICY, "PATCH", {"origin": EVIL}, ("127.0.0.1", 8000), 403),
    (POLICY, "POST", {"origin": "null"}, ("127.0.0.1", 8000), 403),  # a sandboxed frame, a file
    (POLICY, "POST", {"origin": "http://127.0.0.1:9999"}, ("127.0.0.1", 8000), 403),  # another port: another site
    (POLICY, "POST", {"origin": "https://viewer.example.org"}, ("127.0.0.1", 8000), 403),  # not the listed port
    (POLICY, "POST", {"sec-fetch-site": "cross-site"}, ("127.0.0.1", 8000), 403),
    (POLICY, "POST", {"sec-fetch-site": "same-origin"}, ("127.0.0.1", 8000), None),
    (POLICY, "WEBSOCKET", {"origin": EVIL}, ("127.0.0.1", 8000), 403),
    # DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 is same-origin.
    (POLICY, "GET", {"host": "evil.example:8000", "origin": "http://evil.example:8000"}, ("127.0.0.1", 8000), 421),
    (POLICY, "POST", {"host": "evil.example:8000", "origin": "http://evil.example:8000"}, ("127.0.0.1", 8000), 421),
    (POLICY, "GET", {"host": "evil.example"}, ("::1", 8000), 421),
    (POLICY, "GET", {"host": "[::1]:8000"}, ("::1", 8000), None),
    (POLICY, "GET", {"host": "app.localhost:8000"}, ("127.0.0.1", 8000), None),
    (POLICY, "GET", {"host": "evil.example"}, ("10.0.0.5", 8000), None),  # not on loopback, no list: any name
    (HOSTS, "GET", {"host": "evil.example"}, ("10.0.0.5", 8000), 421),  # with a list: on every address
    (HOSTS, "GET", {"host": "labeling.example.org:8000"}, ("127.0.0.1", 8000), None),
    (HOSTS, "POST", {"host": "LABELING.example.org", "origin": "https://labeling.example.org"}, ("10.0.0.5", 80), None),
    (HOSTS, "GET", {"host": "10.0.0.5:8000"}, ("10.0.0.5", 8000), None),  # an address is never a rebound name
]


@pytest.mark.parametrize(("policy", "method", "headers", "server", "status"), CASES)
def test_which_requests_are_refused(
    policy: CrossSitePolicy, method: str, headers: dict, server: tuple[str, int], status: int | None
) -> None:
    kind = "websocket" if method == "WEBSOCKET" else "http"
    error = policy.refusal(_scope(method, headers, server=server, kind=kind))
    assert (error.status_code if error else None) == status, error and error.detail


@pytest.mark.parametrize(
    ("headers", "server", "match"),
    [
        ({"origin": EVIL}, ("127.0.0.1", 8000), r"Refused POST /train/hippocampus from the web page at https://evil"),
        ({"origin": EVIL}, ("127.0.0.1", 8000), r"origins listed in --conf cors_origins \(3D Slicer, QuPath"),
        ({"sec-fetch-site": "cross-site"}, ("127.0.0.1", 8000), r"Sec-Fetch-Site: cross-site"),
        ({"host": "evil.example"}, ("127.0.0.1", 8000), r"host name 'evil.example'.*--conf allowed_hosts"),
    ],
)
def test_a_refusal_says_why_and_what_to_do(headers: dict, server: tuple[str, int], match: str) -> None:
    error = POLICY.refusal(_scope("POST", headers, server=server))
    assert error is not None
    with pytest.raises(type(error), match=match):
        raise error


@pytest.mark.parametrize(
    ("text", "origin"),
    [
        ("https://Viewer.Example.org", "https://viewer.example.org"),
        ("http://viewer:80/", "http://viewer"),
        ("https://viewer:443", "https://viewer"),
        ("http://127.0.0.1:3000", "http://127.0.0.1:3000"),
        ("http://[::1]:3000", "http://[::1]:3000"),
    ],
)
def test_origins_are_written_as_browsers_send_them(text: str, origin: str) -> None:
    assert normal_origin(text) == origin


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("*", "expected an origin such as"),
        ("viewer.example.org", "expected an origin such as"),
        ("https://viewer.example.org/ohif", "expected an origin such as"),
        ("ftp://viewer.example.org", "expected an origin such as"),
        ("https://user@viewer.example.org", "expected an origin such as"),
        ("https://viewer.example.org:99999", "port number between 0 and 65535"),
    ],
)
def test_a_malformed_origin_is_refused(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        normal_origin(text)


def test_a_malformed_host_name_is_refused() -> None:
    assert normal_host(" Labeling.Example.org. ") == "labeling.example.org"
    with pytest.raises(ValueError, match="expected a host name such as labeling.example.org"):
        normal_host("https://labeling.example.org:8000")


@pytest.mark.parametrize(
    ("conf", "match"),
    [
        ({"cors_origins": "*"}, r"--conf cors_origins: expected an origin such as"),
        ({"cors_origins": "https://a.example,https://b.example/path"}, r"--conf cors_origins: expected an origin"),
        ({"allowed_hosts": "https://labeling.example.org"}, r"--conf allowed_hosts: expected a host name"),
    ],
)
def test_bad_cross_site_options_stop_the_server(conf: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AppSettings.from_conf(conf, list(MODELS))


def test_cross_site_options_parsed() -> None:
    assert AppSettings.from_conf({}, list(MODELS)).cors_origins == ()
    s = AppSettings.from_conf(
        {"cors_origins": "https://A.example, http://b.example:3000", "allowed_hosts": "lab"}, list(MODELS)
    )
    assert (s.cors_origins, s.allowed_hosts) == (("https://a.example", "http://b.example:3000"), ("lab",))


def test_monai_label_s_cors_origins_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_CORS_ORIGINS", ["https://viewer.example.org/"])
    assert server_policy(["http://b.example"], []).allowed_origins == {"https://viewer.example.org", "http://b.example"}
    monkeypatch.setattr(settings, "MONAI_LABEL_CORS_ORIGINS", ["https://viewer.example.org/ohif"])
    with pytest.raises(ValueError, match="MONAI_LABEL_CORS_ORIGINS: expected an origin such as"):
        server_policy([], [])


def _monai_like_app(monkeypatch: pytest.MonkeyPatch) -> Starlette:
    """A Starlette app with MONAI Label's CORS (every origin, credentials), its stack built."""

    async def endpoint(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    cors = Middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"])
    app = Starlette(routes=[Route("/info/", endpoint, methods=["GET", "POST"])], middleware=[cors])
    app.middleware_stack = app.build_middleware_stack()
    monkeypatch.setitem(sys.modules, "monailabel.app", SimpleNamespace(app=app))
    return app


def _ask(app: Starlette, method: str, headers: dict[str, str]) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
            return await client.request(method, "/info/", headers=headers)

    return asyncio.run(go())


PREFLIGHT = {"Origin": EVIL, "Access-Control-Request-Method": "DELETE", "Cookie": "a=b"}


def test_monai_label_s_cors_reflected_every_origin_with_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The finding, on MONAI Label's set-up as it is (what the test below changes)."""
    app = _monai_like_app(monkeypatch)
    r = _ask(app, "OPTIONS", PREFLIGHT)
    assert r.headers["access-control-allow-origin"] == EVIL
    assert r.headers["access-control-allow-credentials"] == "true"


@pytest.mark.parametrize(
    ("origins", "origin", "allowed"),
    [((), EVIL, None), ((), VIEWER, None), ((VIEWER,), EVIL, None), ((VIEWER,), VIEWER, VIEWER)],
)
def test_cors_answers_listed_origins_only_and_never_with_credentials(
    monkeypatch: pytest.MonkeyPatch, origins: tuple[str, ...], origin: str, allowed: str | None
) -> None:
    app = _monai_like_app(monkeypatch)
    assert guard_cross_site(CrossSitePolicy.from_lists(origins, []))
    for method, headers in (("OPTIONS", {**PREFLIGHT, "Origin": origin}), ("GET", {"Origin": origin, "Cookie": "a"})):
        r = _ask(app, method, headers)
        assert r.headers.get("access-control-allow-origin") == allowed, (method, r.headers)
        assert "access-control-allow-credentials" not in r.headers
    r = _ask(app, "POST", {"Origin": origin})
    assert r.status_code == (200 if allowed else 403), r.text


def test_nothing_is_changed_outside_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "monailabel.app", raising=False)
    assert not guard_cross_site(CrossSitePolicy())


# -- against a real server -------------------------------------------------------------------------

CASE = HIPPO / "imagesTr" / "hippocampus_001.nii.gz"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    conf = {"cors_origins": VIEWER, "allowed_hosts": "labeling.example.org"}
    with one_case_server(tmp_path_factory.mktemp("cross_site"), **conf) as running:
        yield running


def _label_form(value: int) -> dict:
    image = nib.load(CASE)
    data = np.zeros(image.shape, np.uint8)
    data[10:12, 10:12, 10:12] = value
    buffer = io.BytesIO(nib.Nifti1Image(data, image.affine).to_bytes())
    return {"label": ("label.nii", buffer, "application/octet-stream")}


def _saved_labels(server: Server) -> dict:
    return server.http.get("/datastore/", params={"output": "all"}).json()["objects"]["hippocampus_001"]["labels"]


@pytest.mark.slow
@requires_shared
def test_another_site_s_page_cannot_drive_the_server(server: Server, tmp_path: Path) -> None:
    http = server.http
    page = {"Origin": EVIL}
    labels_before = _saved_labels(server)  # another test of the module may have saved one first
    # Reads: no CORS answer for the page, so the browser keeps the images and the dataset from it.
    for path in ("/info/", "/datastore/dataset", "/datastore/image?image=hippocampus_001"):
        r = http.get(path, headers=page)
        assert "access-control-allow-origin" not in r.headers, (path, r.headers)
    r = http.options("/datastore/label", headers={**page, "Access-Control-Request-Method": "DELETE"})
    assert "access-control-allow-origin" not in r.headers and "access-control-allow-credentials" not in r.headers
    # Writes, including the "simple" ones a form sends without asking first: refused before they start.
    writes = [
        ("POST", "/train/hippocampus", {"data": {"x": "1"}}),  # multipart/form-data, no preflight
        ("POST", "/train/hippocampus", {"content": b"{}", "headers": {"Content-Type": "text/plain"}}),
        ("PUT", "/datastore/label?image=hippocampus_001&tag=final", {"files": _label_form(1)}),
        ("DELETE", "/datastore/label?id=hippocampus_001&tag=final", {}),
        ("PUT", "/model/hippocampus", {"files": {"file": ("m.pt", b"\0" * 64)}}),
        ("DELETE", "/model/hippocampus", {}),
        ("POST", "/activelearning/random", {"json": {"client_id": "page"}}),
    ]
    for method, path, kwargs in writes:
        headers = {**page, **kwargs.pop("headers", {})}
        r = http.request(method, path, headers=headers, **kwargs)
        assert r.status_code == 403 and "from the web page at https://evil.example" in r.json()["detail"], r.text
    r = http.delete("/datastore/label?id=hippocampus_001&tag=final", headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403 and "Sec-Fetch-Site: cross-site" in r.json()["detail"], r.text
    assert _saved_labels(server) == labels_before, "the page changed no label"
    # DNS rebinding: the page's own name, resolved to 127.0.0.1.
    r = http.get("/datastore/dataset", headers={"Host": f"evil.example:{server.url.rsplit(':', 1)[1]}"})
    assert r.status_code == 421 and "DNS rebinding" in r.json()["detail"], r.text


@pytest.mark.slow
@requires_shared
def test_native_clients_our_own_pages_and_listed_viewers_keep_working(server: Server) -> None:
    http = server.http
    port = server.url.rsplit(":", 1)[1]
    for value, headers in [
        (1, {}),  # 3D Slicer, curl
        (2, {"Origin": server.url, "Sec-Fetch-Site": "same-origin"}),  # our own /ohif/
        (1, {"Origin": VIEWER, "Sec-Fetch-Site": "cross-site"}),  # a listed viewer
        (2, {"Host": f"labeling.example.org:{port}"}),  # a listed host name
        (1, {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}),
    ]:
        r = http.put(
            "/datastore/label",
            params={"image": "hippocampus_001", "tag": "final"},
            files=_label_form(value),
            headers=headers,
        )
        assert r.status_code == 200, (headers, r.text)
    assert "final" in _saved_labels(server)
    r = http.get("/info/", headers={"Origin": VIEWER})
    assert r.headers["access-control-allow-origin"] == VIEWER and "access-control-allow-credentials" not in r.headers
    r = http.options("/datastore/label", headers={"Origin": VIEWER, "Access-Control-Request-Method": "PUT"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == VIEWER
