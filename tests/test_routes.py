"""Routes put in front of MONAI Label's: refusals answer first, everything else passes through."""

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

from appcore.errors import conflict, not_found
from appcore.routes import refuse_early


async def _original(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"original {request.method} {request.path_params['model']}")


def _refusal(params: dict) -> object:
    if params["model"] == "unknown":
        return not_found("Unknown model 'unknown'")
    if params["model"] == "unlabelled":
        return conflict("nothing to train on")
    return None


def _request(app: Starlette, method: str, path: str) -> httpx.Response:
    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://server") as client:
            return await client.request(method, path)

    return asyncio.run(send())


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Starlette:
    app = Starlette(routes=[Route("/train/{model}", _original, methods=["GET", "POST"])])
    monkeypatch.setitem(sys.modules, "monailabel.app", SimpleNamespace(app=app))
    return app


@pytest.mark.parametrize(
    ("method", "model", "status", "body"),
    [
        ("post", "unknown", 404, {"detail": "Unknown model 'unknown'"}),
        ("post", "unlabelled", 409, {"detail": "nothing to train on"}),
        ("post", "hippocampus", 200, "original POST hippocampus"),
        ("get", "unknown", 200, "original GET unknown"),  # only the methods named are checked
    ],
)
def test_refusals_answer_first_and_the_rest_reaches_the_original(
    server: Starlette, method: str, model: str, status: int, body: object
) -> None:
    assert refuse_early("/train/{model}", ["POST"], _refusal, name="refuse_train")
    r = _request(server, method.upper(), f"/train/{model}")
    assert r.status_code == status
    assert (r.json() if status >= 400 else r.text) == body


def test_a_refusal_is_put_in_place_once(server: Starlette) -> None:
    for _ in range(3):
        assert refuse_early("/train/{model}", ["POST"], _refusal, name="refuse_train")
    assert len(server.router.routes) == 2


def test_nothing_is_inserted_outside_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "monailabel.app", raising=False)
    assert refuse_early("/train/{model}", ["POST"], _refusal, name="refuse_train") is False
