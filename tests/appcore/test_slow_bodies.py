"""A client that announces a body and stalls gets a 408 and holds no worker thread meanwhile."""

from __future__ import annotations

import asyncio
import io
import socket
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import nibabel as nib
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from appcore.routes import serve_in_threads, time_request_bodies
from appcore.settings import AppSettings
from radiology.registry import MODELS
from tests.conftest import HIPPO, requires_shared
from tests.servers import Server, one_case_server


async def _echo(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{len(await request.body())} bytes")


def _server_app(monkeypatch: pytest.MonkeyPatch, idle_s: float, threads: int | None = None) -> Starlette:
    app = Starlette(routes=[Route("/upload", _echo, methods=["PUT"])])
    app.middleware_stack = app.build_middleware_stack()
    monkeypatch.setitem(sys.modules, "monailabel.app", SimpleNamespace(app=app))
    if threads is not None:
        assert serve_in_threads("/upload", ["PUT"], name="threaded", threads=threads)
    assert time_request_bodies(idle_s)
    return app


async def _call(app: Starlette, chunks: list[bytes | None]) -> tuple[int, bytes, dict]:
    """A PUT whose body arrives as ``chunks``; ``None`` is a stall (nothing more ever comes)."""
    scope = {
        "type": "http",
        "method": "PUT",
        "path": "/upload",
        "raw_path": b"/upload",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000")],
        "server": ("127.0.0.1", 8000),
    }
    pending = list(chunks)
    answer: dict = {"body": b""}

    async def receive() -> dict:
        if not pending:
            await asyncio.Event().wait()  # a client that stays connected after its body
        chunk = pending.pop(0)
        if chunk is None:
            await asyncio.Event().wait()  # forever
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer["status"], answer["headers"] = message["status"], dict(message["headers"])
        else:
            answer["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return answer["status"], answer["body"], answer["headers"]


@pytest.mark.parametrize("threads", [None, 1])  # MONAI Label's route as it is, and one served in threads
def test_a_stalled_body_gets_a_408_that_says_why(monkeypatch: pytest.MonkeyPatch, threads: int | None) -> None:
    app = _server_app(monkeypatch, idle_s=0.3, threads=threads)
    status, body, headers = asyncio.run(asyncio.wait_for(_call(app, [b"part", None]), 30))
    assert status == 408, body
    assert b"nothing came for 0.3 s (--conf body_timeout_s)" in body and headers[b"connection"] == b"close"
    assert asyncio.run(_call(app, [b"a" * 10, b"b" * 10]))[:2] == (200, b"20 bytes")


def test_a_stalled_body_holds_no_thread_of_its_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """The route has one thread; a request stalled in its body does not take it from the next one."""
    app = _server_app(monkeypatch, idle_s=60, threads=1)

    async def go() -> tuple[int, bytes, dict]:
        stalled = [asyncio.create_task(_call(app, [b"x", None])) for _ in range(3)]
        await asyncio.sleep(0.2)
        try:
            return await asyncio.wait_for(_call(app, [b"label"]), 20)
        finally:
            for task in stalled:
                task.cancel()

    assert asyncio.run(go())[:2] == (200, b"5 bytes")


def test_a_body_over_spooled_size_is_handed_on_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    app = _server_app(monkeypatch, idle_s=5, threads=2)
    chunks = [bytes([i]) * 700_000 for i in range(4)]  # over the 1 MB kept in memory
    assert asyncio.run(_call(app, chunks))[:2] == (200, b"2800000 bytes")


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("0", "body_timeout_s: must be at least 0.1"),
        ("inf", "expected a number of seconds"),
        ("x", "expected a number"),
    ],
)
def test_a_bad_body_timeout_stops_the_server(value: str, match: str) -> None:
    assert AppSettings.from_conf({}, list(MODELS)).body_timeout_s == 60.0
    with pytest.raises(ValueError, match=match):
        AppSettings.from_conf({"body_timeout_s": value}, list(MODELS))


# -- against a real server -------------------------------------------------------------------------

CASE = HIPPO / "imagesTr" / "hippocampus_001.nii.gz"
TIMEOUT_S = 30  # the server's --conf body_timeout_s here
STALLED = 20  # more than the 16 threads of PUT /datastore/label


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with one_case_server(tmp_path_factory.mktemp("slow_bodies"), body_timeout_s=str(TIMEOUT_S)) as running:
        yield running


def _stall(url: str) -> socket.socket:
    """A label upload that announces 10 MB, sends the start of its form and then nothing."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        "PUT /datastore/label?image=hippocampus_001&tag=final HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Content-Type: multipart/form-data; boundary=b0undary\r\n"
        "Content-Length: 10000000\r\n\r\n"
        "--b0undary\r\n"
        'Content-Disposition: form-data; name="label"; filename="label.nii"\r\n\r\n'
    )
    sock.sendall(head.encode() + b"\0" * 1000)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """What the server sent on ``sock`` so far, without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return b""


@pytest.mark.slow
@requires_shared
def test_stalled_uploads_do_not_block_another_client_s_label_save(server: Server) -> None:
    stalled = [_stall(server.url) for _ in range(STALLED)]
    try:
        time.sleep(1)  # every stalled request has reached its route
        image = nib.load(CASE)
        data = np.zeros(image.shape, np.uint8)
        data[10:12, 10:12, 10:12] = 1
        label = io.BytesIO(nib.Nifti1Image(data, image.affine).to_bytes())
        started = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=TIMEOUT_S - 5) as http:
            r = http.put(
                "/datastore/label",
                params={"image": "hippocampus_001", "tag": "final"},
                files={"label": ("label.nii", label, "application/octet-stream")},
            )
        seconds = time.monotonic() - started
        assert r.status_code == 200, r.text
        # Saved while every stalled upload was still waiting for its body (none had its 408 yet).
        assert seconds < TIMEOUT_S - 5 and all(_answer(s) == b"" for s in stalled), seconds
        deadline = time.monotonic() + TIMEOUT_S + 30
        answers = []
        for sock in stalled:
            sock.setblocking(True)
            sock.settimeout(max(1.0, deadline - time.monotonic()))
            answer = b""
            while chunk := sock.recv(65536):  # the server closes the connection after its 408
                answer += chunk
            answers.append(answer)
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert f"nothing came for {TIMEOUT_S} s (--conf body_timeout_s)".encode() in answer, answer
    finally:
        for sock in stalled:
            sock.close()
    # The label saved stays: the stalled uploads stored nothing.
    listing = server.http.get("/datastore/", params={"output": "all"}).json()["objects"]["hippocampus_001"]
    assert "final" in listing["labels"], listing
