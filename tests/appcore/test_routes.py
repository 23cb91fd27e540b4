"""Routes put in front of MONAI Label's: refusals answer first, everything else passes through whole."""

from __future__ import annotations

import asyncio
import sys
from types import SimpleNamespace

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from appcore.errors import conflict, not_found, unprocessable
from appcore.routes import MAX_CHECKED_BODY, limit_request_bodies, refuse_early, serve_in_threads


async def _original(request: Request) -> PlainTextResponse:
    body = (await request.body()).decode()
    return PlainTextResponse(f"original {request.method} {request.path_params['model']} {body}")


def _refusal(params: dict, body: bytes) -> object:
    if params["model"] == "unknown":
        return not_found("Unknown model 'unknown'")
    if params["model"] == "unlabelled":
        return conflict("nothing to train on")
    if b'"x"' in body:
        return unprocessable("bad parameter")
    return None


def _request(app: Starlette, method: str, path: str, body: bytes = b"") -> httpx.Response:
    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://server") as client:
            return await client.request(method, path, content=body)

    return asyncio.run(send())


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Starlette:
    app = Starlette(
        routes=[
            Route("/train/{model}", _original, methods=["GET", "POST"]),
            Route("/post_only/{model}", _original, methods=["POST"]),
        ]
    )
    monkeypatch.setitem(sys.modules, "monailabel.app", SimpleNamespace(app=app))
    assert refuse_early("/train/{model}", ["POST"], _refusal, name="refuse_train")
    assert refuse_early("/post_only/{model}", ["POST"], _refusal, name="refuse_post_only")
    app.router.routes.append(Route("/upload/{model}", _original, methods=["POST"]))
    assert refuse_early("/upload/{model}", ["POST"], _query_refusal, name="refuse_upload", read_body=False)
    return app


def _query_refusal(params: dict, body: bytes) -> object:
    assert body == b"", "an upload route's body is not read"
    return unprocessable("not that output") if params.get("output") == "bad" else None


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "answer"),
    [
        ("POST", "/train/unknown", b"", 404, {"detail": "Unknown model 'unknown'"}),
        ("POST", "/train/unlabelled", b"", 409, {"detail": "nothing to train on"}),
        ("POST", "/train/hippocampus", b'{"max_epochs": "x"}', 422, {"detail": "bad parameter"}),
        ("POST", "/train/hippocampus", b'{"max_epochs": 2}', 200, 'original POST hippocampus {"max_epochs": 2}'),
        ("POST", "/train/hippocampus", b"", 200, "original POST hippocampus "),
        ("GET", "/train/unknown", b"", 200, "original GET unknown "),  # only the methods named are checked
        ("GET", "/post_only/unknown", b"", 405, None),  # as without the refusal
        ("POST", "/train/hippocampus", b" " * (MAX_CHECKED_BODY + 1), 413, None),
        ("POST", "/train/unknown?model=hippocampus", b"", 404, {"detail": "Unknown model 'unknown'"}),  # path wins
        ("POST", "/upload/ct?output=bad", b"x", 422, {"detail": "not that output"}),
        ("POST", "/upload/ct?output=image", b"x" * (2 * MAX_CHECKED_BODY), 200, "original POST ct " + "x" * 2**21),
    ],
)
def test_refusals_answer_first_and_the_rest_reaches_the_original(
    server: Starlette, method: str, path: str, body: bytes, status: int, answer: object
) -> None:
    r = _request(server, method, path, body)
    assert r.status_code == status, r.text
    if answer is not None:
        assert (r.json() if status >= 400 else r.text) == answer


def test_a_refusal_is_put_in_place_once(server: Starlette) -> None:
    for _ in range(3):
        assert refuse_early("/train/{model}", ["POST"], _refusal, name="refuse_train")
    assert len(server.router.routes) == 6


def test_nothing_is_inserted_outside_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "monailabel.app", raising=False)
    assert refuse_early("/train/{model}", ["POST"], _refusal, name="refuse_train") is False


def _upload_server(monkeypatch: pytest.MonkeyPatch) -> tuple[Starlette, list[int]]:
    """A server with one upload route, and the sizes of the bodies that route has read."""
    read: list[int] = []

    async def upload(request: Request) -> PlainTextResponse:
        read.append(len(await request.body()))
        return PlainTextResponse("stored")

    app = Starlette(routes=[Route("/datastore/label", upload, methods=["PUT"])])
    monkeypatch.setitem(sys.modules, "monailabel.app", SimpleNamespace(app=app))
    return app, read


def test_a_body_over_the_limit_is_refused_before_it_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    app, read = _upload_server(monkeypatch)
    assert not limit_request_bodies(100), "no server stack yet: nothing to wrap"
    app.middleware_stack = app.build_middleware_stack()  # as Starlette has it once the server runs
    assert limit_request_bodies(100) and limit_request_bodies(100), "wrapping twice keeps one limit"
    ok = _request(app, "PUT", "/datastore/label", b"x" * 100)
    assert ok.status_code == 200 and read == [100]
    big = _request(app, "PUT", "/datastore/label", b"x" * 101)
    assert big.status_code == 413 and "limited to 9.53674e-05 MB" in big.json()["detail"]
    assert limit_request_bodies(100, limit_mb=0.0001)
    assert "limited to 0.0001 MB" in _request(app, "PUT", "/datastore/label", b"x" * 101).json()["detail"]
    assert read == [100], "the endpoint never saw the refused body"


def test_a_chunked_body_is_refused_once_it_passes_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    app, read = _upload_server(monkeypatch)
    app.middleware_stack = app.build_middleware_stack()
    assert limit_request_bodies(100)

    def chunked(sizes: list[int]) -> httpx.Response:
        async def body():  # no Content-Length: the size is known only as the chunks arrive
            for n in sizes:
                yield b"x" * n

        async def send() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://server") as client:
                return await client.put("/datastore/label", content=body())

        return asyncio.run(send())

    ok = chunked([50, 50])
    assert ok.status_code == 200 and read == [100]
    big = chunked([50, 50, 1, 1000])
    assert big.status_code == 413 and "it was not stored" in big.text
    assert read == [100], "the endpoint never got the refused body"


def test_a_threaded_route_no_longer_holds_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    async def blocking(request: Request) -> PlainTextResponse:  # as MONAI Label's: async, but never awaits
        body = await request.body()
        time.sleep(0.5)
        if body == b"refuse":
            raise not_found("no such image")
        return PlainTextResponse(f"segmented {len(body)}")

    async def ping(request: Request) -> PlainTextResponse:
        return PlainTextResponse("pong")

    def served(threaded: bool) -> tuple[list[str], list[int | str]]:
        app = Starlette(routes=[Route("/infer/{model}", blocking, methods=["POST"]), Route("/info", ping)])
        monkeypatch.setitem(sys.modules, "monailabel.app", SimpleNamespace(app=app))
        if threaded:
            assert serve_in_threads("/infer/{model}", ["POST"], name="threaded infer")
        done: list[str] = []

        async def call(client: httpx.AsyncClient, method: str, path: str, body: bytes = b"") -> int | str:
            await asyncio.sleep(0.1 if path == "/info" else 0)  # the infers start first
            r = await client.request(method, path, content=body)
            done.append(f"{method} {path}")
            return r.status_code if r.status_code != 200 else r.text

        async def both() -> list[int | str]:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
                return await asyncio.gather(
                    call(client, "POST", "/infer/ct", b"x" * 10),
                    call(client, "GET", "/info"),
                    call(client, "POST", "/infer/ct", b"refuse"),
                    call(client, "GET", "/infer/ct"),
                )

        return done, asyncio.run(both())

    done, answers = served(threaded=False)
    assert done.index("GET /info") > done.index("POST /infer/ct"), "unthreaded, /info waits for an infer"
    done, answers = served(threaded=True)
    assert done.index("GET /info") < done.index("POST /infer/ct"), "threaded, /info answers while the infers run"
    assert answers == ["segmented 10", "pong", 404, 405], "answers, errors and methods as without the thread"


def test_each_threaded_route_has_threads_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    async def slow_upload(request: Request) -> PlainTextResponse:
        time.sleep(0.6)  # a slow client or a slow check, holding its thread
        return PlainTextResponse("stored")

    async def info(request: Request) -> PlainTextResponse:
        return PlainTextResponse("info")

    app = Starlette(routes=[Route("/upload", slow_upload, methods=["PUT"]), Route("/info", info)])
    monkeypatch.setitem(sys.modules, "monailabel.app", SimpleNamespace(app=app))
    assert serve_in_threads("/upload", ["PUT"], name="threaded upload", threads=1)
    assert serve_in_threads("/info", ["GET"], name="threaded info", threads=1)
    finished: dict[str, list[float]] = {"PUT": [], "GET": []}

    async def call(client: httpx.AsyncClient, method: str, path: str, start: float) -> None:
        await asyncio.sleep(0.05 if method == "GET" else 0)
        assert (await client.request(method, path)).status_code == 200
        finished[method].append(time.perf_counter() - start)

    async def run() -> None:
        start = time.perf_counter()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://server") as client:
            await asyncio.gather(
                *(call(client, "PUT", "/upload", start) for _ in range(3)), call(client, "GET", "/info", start)
            )

    asyncio.run(run())
    assert sorted(finished["PUT"])[-1] >= 1.75, "one thread for the uploads: one after the other"
    assert finished["GET"][0] < min(finished["PUT"]), "/info waited for a thread the uploads held"


def test_a_refusing_and_a_threaded_route_on_one_path_pass_a_request_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the apps install them for /infer/{model}: the threaded route first, the refusing one then in
    front of it. Starlette's routes compare equal by path, endpoint and methods: the route behind
    each must be found by identity, or the threaded route hands the request to itself forever."""
    app = Starlette(routes=[Route("/infer/{model}", _original, methods=["POST"])])
    monkeypatch.setitem(sys.modules, "monailabel.app", SimpleNamespace(app=app))
    assert serve_in_threads("/infer/{model}", ["POST"], name="threaded infer")
    assert refuse_early("/infer/{model}", ["POST"], _refusal, name="refuse_infer", read_body=False)

    async def send(path: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://server") as client:
            return await asyncio.wait_for(client.post(path, content=b"scan"), timeout=10)

    r = asyncio.run(send("/infer/ct"))
    assert r.status_code == 200 and r.text == "original POST ct scan"
    assert asyncio.run(send("/infer/unknown")).status_code == 404
