"""The one place where decisions become HTTP statuses: a ``text/plain`` one-line reason."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from estkit.ca import errors as ca

CHALLENGE = {"WWW-Authenticate": 'Basic realm="estkit"'}

_STATUS: dict[type[ca.CaError], int] = {
    ca.BadRequest: 400,
    ca.Unauthenticated: 401,
    ca.Forbidden: 403,
    ca.NotFound: 404,
    ca.Conflict: 409,
}


class RequestError(Exception):
    """An HTTP-level refusal (media type, size) before the authority is asked."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def one_line(text: str) -> str:
    return " ".join(text.split())[:300] + "\n"


def text_response(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    return PlainTextResponse(one_line(reason), status_code=status, headers=headers)


def error_response(
    request: Request, status: int, reason: str, headers: dict[str, str] | None = None
) -> Response:
    """EST and the rest: text/plain, one line. The JSON API: ``{"detail": reason}``."""
    if request.url.path.startswith("/api/"):
        if status == 401:
            headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="estkit"'}
        return JSONResponse(
            {"detail": one_line(reason).strip()}, status_code=status, headers=headers
        )
    return text_response(status, reason, headers)


async def ca_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ca.CaError)
    if isinstance(exc, ca.Pending):
        return text_response(202, str(exc), {"Retry-After": str(int(exc.retry_after))})
    status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 500)
    return error_response(request, status, str(exc), CHALLENGE if status == 401 else None)


async def request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return error_response(request, exc.status, str(exc), CHALLENGE if exc.status == 401 else None)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(request, exc.status_code, exc.detail or "error", dict(exc.headers or {}))


async def validation_error(request: Request, exc: Exception) -> Response:
    """Invalid API input: 422 with the first problem as one line (``where: what``)."""
    assert isinstance(exc, RequestValidationError)
    problems = exc.errors()
    first = problems[0] if problems else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    reason = f"{where}: {first.get('msg', 'invalid input')}"
    if len(problems) > 1:
        reason += f" (and {len(problems) - 1} more)"
    return error_response(request, 422, reason)


HANDLERS = {
    ca.CaError: ca_error,
    RequestError: request_error,
    HTTPException: http_error,
    RequestValidationError: validation_error,
}
