"""Client errors that reach the user as 4xx answers with a message saying what was wrong."""

from __future__ import annotations

from fastapi import HTTPException


class RequestError(HTTPException):
    """A request the server refuses; ``status_code`` is 4xx and ``detail`` tells how to fix it.

    It subclasses FastAPI's ``HTTPException`` so that raising it anywhere below a MONAI Label endpoint
    answers with that status instead of a 500; outside a server it is an ordinary exception.
    """

    def __init__(self, status_code: int, detail: str) -> None:
        if not 400 <= status_code < 500:
            raise ValueError(f"RequestError is for 4xx statuses, got {status_code}")
        super().__init__(status_code=status_code, detail=detail)

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail}"


def bad_request(detail: str) -> RequestError:
    return RequestError(400, detail)


def forbidden(detail: str) -> RequestError:
    return RequestError(403, detail)


def not_found(detail: str) -> RequestError:
    return RequestError(404, detail)


def method_not_allowed(detail: str, allowed: str) -> RequestError:
    error = RequestError(405, detail)
    error.headers = {"Allow": allowed}
    return error


def request_timeout(detail: str) -> RequestError:
    """A 408; the connection is closed after it, as the rest of the body may still be on its way."""
    error = RequestError(408, detail)
    error.headers = {"Connection": "close"}
    return error


def conflict(detail: str) -> RequestError:
    return RequestError(409, detail)


def too_large(detail: str) -> RequestError:
    return RequestError(413, detail)


def unprocessable(detail: str) -> RequestError:
    return RequestError(422, detail)


def too_many(detail: str) -> RequestError:
    return RequestError(429, detail)


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception ``error`` was raised from (MONAI wraps a transform's error in a
    ``RuntimeError`` that names only the transform)."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    return error
