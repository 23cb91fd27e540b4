"""Routes this project puts in front of MONAI Label's own, inside the running server process.

MONAI Label builds its FastAPI application before it creates the app and has no hook for extra
checks; routes can still be inserted at the front of the router's list, where Starlette tries them
first (``appcore.seam.insert_first``; which routes, in ``appcore.seam.table``). Outside the server
process (a training child, a test building the app in-process) there is no server and nothing is
inserted.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import parse_qsl

from appcore.errors import RequestError, request_timeout, too_large
from appcore.seam import insert_first, server_routes, server_stack, set_server_stack

# Given a request's path and query parameters and its body, why it is refused, or None to let
# MONAI Label's route answer.
Refusal = Callable[[dict[str, Any], bytes], RequestError | None]

MAX_CHECKED_BODY = 1 << 20  # the requests checked here carry a small JSON body or none


async def _answered_in_handle(request: Any) -> None:
    """The endpoint of the routes below, never called: their ``handle`` answers instead."""
    raise AssertionError("not called")


def refuse_early(path: str, methods: Collection[str], refusal: Refusal, name: str, *, read_body: bool = True) -> bool:
    """Answer requests to ``path`` with the 4xx ``refusal`` gives, before MONAI Label's route sees them.

    MONAI Label starts a training or scoring for any name and any parameters and reports the
    failure later in the task's status; a refusal here answers at once instead. ``refusal`` gets the
    path and query parameters (path first) and the body. A request it accepts (it returns None) is
    handed, body included, to the route behind this one. Bodies over ``MAX_CHECKED_BODY`` are
    refused with a 413 (these endpoints take small JSON); with ``read_body=False`` (an upload
    route) the body is not read, ``refusal`` gets ``b""`` and the request passes on untouched.
    ``refusal`` runs in a worker thread, so one that asks a hung PACS holds only its own request.
    """
    routes = server_routes()
    if routes is None:
        return False
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    class _Refusing(Route):
        async def handle(self, scope: Any, receive: Any, send: Any) -> None:
            if self.methods and scope["method"] not in self.methods:
                return await super().handle(scope, receive, send)  # 405, as without this route
            params = {**dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"))), **scope["path_params"]}
            body, more, error = b"", read_body, None
            while more and error is None:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > MAX_CHECKED_BODY:
                    error = too_large(f"The request body is over {MAX_CHECKED_BODY} bytes")
            if error is None:  # in a worker thread: a refusal may ask the datastore (on a PACS, a query)
                error = await run_in_threadpool(refusal, params, body)
            if error is not None:
                response = JSONResponse({"detail": error.detail}, status_code=error.status_code)
                return await response(scope, receive, send)

            replayed = not read_body

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            route, child = _route_behind(self, routes, scope)
            return await route.handle({**scope, **child}, replay, send)

    return insert_first(_Refusing(path, _answered_in_handle, methods=list(methods), name=name))


def _route_behind(route: Any, routes: list[Any], scope: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The first route after ``route`` that fully matches ``scope``, and its child scope."""
    from starlette.routing import Match

    # By identity: Starlette's routes compare equal by path, endpoint and methods, and a refusing and
    # a threaded route for the same path share all three.
    position = next(i for i, r in enumerate(routes) if r is route)
    for candidate in routes[position + 1 :]:
        match, child = candidate.matches(scope)
        if match is Match.FULL:
            return candidate, child
    raise RuntimeError(f"No route behind {route.name} for {scope['path']}")


def serve_in_threads(path: str, methods: Collection[str], name: str, threads: int = 16) -> bool:
    """Serve requests to ``path`` by the route behind this one, on an event loop of their own in a
    worker thread.

    MONAI Label's endpoints are ``async`` functions that call its synchronous code directly, so an
    infer, an upload's checks or a PACS round trip holds the server's only event loop: every other
    request (``/info``, the viewer's DICOMweb proxy, another clinician's infer) waits for it. Here
    the whole request, body parsing included, runs with ``asyncio.run`` in a worker thread;
    its ``send`` is that of the server's loop, called across threads. Each route has ``threads``
    threads of its own (more requests wait for one), so busy uploads cannot take the threads
    ``/info`` needs. The body is received on the server's loop before a thread is taken
    (``_receive_body``): a client that announces a body and stalls holds no thread, and gets the
    408 of ``time_request_bodies``. Returns whether the route is in place (False outside a server).
    """
    routes = server_routes()
    if routes is None:
        return False
    import asyncio
    import tempfile

    import anyio.to_thread
    from starlette.routing import Route

    class _Threaded(Route):
        limiter: Any = None  # made on the server's loop, at the first request

        async def handle(self, scope: Any, receive: Any, send: Any) -> None:
            if self.methods and scope["method"] not in self.methods:
                return await super().handle(scope, receive, send)  # 405, as without this route
            if self.limiter is None:
                self.limiter = anyio.CapacityLimiter(threads)
            route, child = _route_behind(self, routes, scope)
            server_loop = asyncio.get_running_loop()

            def on_server_loop(call: Any) -> Any:
                async def called(*args: Any) -> Any:
                    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(*args), server_loop))

                return called

            with tempfile.SpooledTemporaryFile(max_size=SPOOLED_IN_MEMORY) as body:
                try:
                    if not await _receive_body(receive, body):
                        return None  # the client went away
                except RequestError as e:  # a stalled body (408), one over the size limit (413)
                    return await _error_response(e)(scope, receive, send)

                def serve() -> None:
                    replay = _replayed(body, on_server_loop(receive))
                    asyncio.run(route.handle({**scope, **child}, replay, on_server_loop(send)))

                await anyio.to_thread.run_sync(serve, limiter=self.limiter)

    return insert_first(_Threaded(path, _answered_in_handle, methods=list(methods), name=name))


SPOOLED_IN_MEMORY = 1 << 20  # a received body over this size waits for its thread in a temporary file


async def _receive_body(receive: Any, body: Any) -> bool:
    """Write the whole request body from ``receive`` into the file ``body`` and go back to its start;
    False if the client left first."""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        body.write(message.get("body", b""))
        more = message.get("more_body", False)
    body.seek(0)
    return True


def _replayed(body: Any, receive: Any) -> Any:
    """A ``receive`` that gives ``body`` (a file) in chunks, then what ``receive`` gives (a disconnect)."""
    done = False

    async def replay() -> dict[str, Any]:
        nonlocal done
        if done:
            return await receive()
        chunk = body.read(SPOOLED_IN_MEMORY)
        done = body.tell() >= _size(body)
        return {"type": "http.request", "body": chunk, "more_body": not done}

    return replay


def _size(file: Any) -> int:
    here = file.tell()
    end = file.seek(0, 2)
    file.seek(here)
    return end


def _error_response(error: RequestError) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)


def time_request_bodies(idle_s: float) -> bool:
    """Answer a request whose body pauses for more than ``idle_s`` seconds between chunks with a 408.

    A client that announces a body (``Content-Length``, or chunked) and then sends nothing held its
    request open for as long as it liked: with MONAI Label's endpoints it held a coroutine, and
    behind ``serve_in_threads`` a worker thread, so 16 such connections blocked every label save.
    Wraps the running server's ASGI stack (as ``limit_request_bodies``); the ``receive`` of every
    request raises the 408 (``appcore.errors.request_timeout``) until the body is complete, after
    which waiting (for a disconnect, during a streamed answer) is not timed. Returns whether it
    did (False outside a server).
    """
    stack = server_stack()
    if stack is None:
        return False
    if isinstance(stack, _BodyTimeout):
        stack.idle_s = idle_s
    else:
        set_server_stack(_BodyTimeout(stack, idle_s))
    return True


class _BodyTimeout:
    """The ASGI layer of ``time_request_bodies``."""

    def __init__(self, app: Any, idle_s: float) -> None:
        self.app, self.idle_s = app, idle_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            receive = self._timed(receive)
        await self.app(scope, receive, send)

    def _timed(self, receive: Any) -> Any:
        import asyncio

        complete = False

        async def timed() -> Any:
            nonlocal complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_s)
            except TimeoutError:
                raise request_timeout(
                    f"The request body stopped arriving: nothing came for {self.idle_s:g} s "
                    "(--conf body_timeout_s). Send the whole body without pausing; nothing of this "
                    "request was stored"
                ) from None
            complete = message.get("type") != "http.request" or not message.get("more_body", False)
            return message

        return timed


def limit_request_bodies(max_bytes: int, *, limit_mb: float | None = None) -> bool:
    """Answer a request that announces a body over ``max_bytes`` (``Content-Length``) with a 413 at once.

    ``limit_mb`` is the limit the message states (``--conf max_upload_mb``; ``max_bytes`` leaves
    room for the form around a file); by default ``max_bytes`` in MB.

    Without this an upload of any size is first written whole to a temporary file and only then
    refused by the size checks behind the endpoints. Wraps the running server's ASGI stack, which
    Starlette has built before the app starts; returns whether it did (False outside a server).
    """
    stack = server_stack()
    if stack is None:
        return False
    stated = max_bytes / 2**20 if limit_mb is None else limit_mb
    if getattr(stack, "max_bytes", None) is not None:
        stack.max_bytes, stack.stated_mb = max_bytes, stated
        return True
    from starlette.responses import JSONResponse

    class _BodyLimit:
        def __init__(self, inner: Any) -> None:
            self.inner, self.max_bytes, self.stated_mb = inner, max_bytes, stated

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                length = dict(scope.get("headers") or []).get(b"content-length", b"")
                if length.isdigit() and int(length) > self.max_bytes:
                    detail = (
                        f"The request body is {int(length) / 2**20:.1f} MB; uploads are limited to "
                        f"{self.stated_mb:g} MB (--conf max_upload_mb)"
                    )
                    response = JSONResponse({"detail": detail}, status_code=413, headers={"Connection": "close"})
                    return await response(scope, receive, send)
                if not length:  # a chunked body announces no size: count it as it arrives
                    receive = self._counted(receive)
            await self.inner(scope, receive, send)

        def _counted(self, receive: Any) -> Any:
            """``receive`` that raises a 413 once the body passes the limit, before more of it is stored
            (the multipart parser spools a file part to disk, whatever its size). FastAPI lets the
            ``HTTPException`` through its body parsing, so the client gets this 413."""
            received = 0

            async def counted() -> Any:
                nonlocal received
                message = await receive()
                if message.get("type") == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_bytes:
                        raise too_large(
                            f"The request body passed {self.stated_mb:g} MB, the limit for uploads "
                            "(--conf max_upload_mb); it was not stored"
                        )
                return message

            return counted

    set_server_stack(_BodyLimit(stack))
    return True
