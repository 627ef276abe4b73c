"""The one place where decisions become HTTP: a status per refusal code.

EST (and every path outside ``/api/``): a ``text/plain`` one-line reason and the
code in the ``Estkit-Refusal-Code`` header; a 401 has an empty body instead, its
reason in the ``Estkit-Refusal-Reason`` header (some clients cannot skip a 401's
body before they answer the challenge). The REST API: RFC 9457
``application/problem+json`` with the same code in its ``code`` member.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from estkit.ca.errors import Code, Refusal, StoreUnavailable
from estkit.ca.ports import translated
from estkit.store.errors import StoreError

CHALLENGE = {"WWW-Authenticate": 'Basic realm="estkit"'}
CODE_HEADER = "Estkit-Refusal-Code"
# Where an EST 401 carries its one-line reason: its body is empty (module docstring).
REASON_HEADER = "Estkit-Refusal-Reason"
REASON_HEADER_LIMIT = 200
PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE = "urn:estkit:refusal:"
# Sent with 503 when the refusal names no delay of its own.
DEFAULT_RETRY_AFTER = 5
# Set in the ASGI scope of a request refused because the database could not take it
# (``StoreUnavailable``): ``server/telemetry.py`` counts it once, as a database error.
STORE_UNAVAILABLE = "estkit.store_unavailable"

STATUS: dict[Code, int] = {
    Code.BAD_CSR: 400,
    Code.KEY_NOT_PERMITTED: 400,
    Code.BAD_REQUEST: 400,
    Code.AUTHENTICATION_REQUIRED: 401,
    Code.SECRET_INVALID: 401,
    Code.TOKEN_INVALID: 401,
    Code.CERTIFICATE_REQUIRED: 403,
    Code.UNKNOWN_CERTIFICATE: 403,
    Code.WRONG_CA: 403,
    Code.EXPIRED: 403,
    Code.NOT_YET_VALID: 403,
    Code.REVOKED: 403,
    Code.NOT_REGISTERED: 403,
    Code.DISABLED: 403,
    Code.DECOMMISSIONED: 403,
    Code.NAME_MISMATCH: 403,
    Code.SUBJECT_CHANGED: 403,
    Code.SAN_NOT_PERMITTED: 403,
    Code.NAME_CONSTRAINTS: 403,
    Code.CHANNEL_BINDING_MISMATCH: 403,
    Code.SCOPE_MISSING: 403,
    Code.APPROVAL_DENIED: 403,
    Code.APPROVAL_PENDING: 202,
    Code.NOT_FOUND: 404,
    Code.CONFLICT: 409,
    Code.RATE_LIMITED: 429,
    Code.UNAVAILABLE: 503,
}
assert set(STATUS) == set(Code)


class RequestError(Exception):
    """An HTTP-level refusal (method, media type, size) before the authority is asked."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def one_line(text: str) -> str:
    return " ".join(text.split())[:300] + "\n"


def text_response(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    return PlainTextResponse(one_line(reason), status_code=status, headers=headers)


def header_reason(reason: str, *, limit: int = REASON_HEADER_LIMIT) -> str:
    """A reason fit for a header value: one line of printable ASCII (anything else
    escaped as ``\\xNN``/``\\uNNNN``), at most ``limit`` characters."""
    text = " ".join(reason.split()).encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text[:limit].rstrip()


def challenge_response(reason: str, headers: dict[str, str] | None = None) -> Response:
    """An EST 401: no body (``Content-Length: 0``), the reason in ``Estkit-Refusal-Reason``.

    Bouncy Castle's EST client closes a 401 unread before it retries with Basic,
    and fails when more than one body byte is left.
    """
    headers = dict(headers or {})
    headers.setdefault("WWW-Authenticate", CHALLENGE["WWW-Authenticate"])
    headers[REASON_HEADER] = header_reason(reason)
    return Response(b"", status_code=401, headers=headers)


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def problem_response(
    status: int, reason: str, code: str | None, headers: dict[str, str] | None = None
) -> Response:
    """RFC 9457 problem details; ``code`` also in ``type`` (a URN) for generic consumers."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, object] = {
        "type": f"{PROBLEM_TYPE}{code}" if code else "about:blank",
        "title": title,
        "status": status,
        "detail": one_line(reason).strip(),
    }
    if code:
        body["code"] = code
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def error_response(
    request: Request,
    status: int,
    reason: str,
    headers: dict[str, str] | None = None,
    *,
    code: str | None = None,
) -> Response:
    """EST and the rest: text/plain, one line, the code in a header. The API: problem+json."""
    headers = dict(headers or {})
    if code:
        headers[CODE_HEADER] = code
    if _is_api(request):
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="estkit"'
        return problem_response(status, reason, code, headers)
    if status == 401:
        return challenge_response(reason, headers)
    return text_response(status, reason, headers)


def refusal_headers(refusal: Refusal, status: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    if status == 401:
        headers.update(CHALLENGE)
    if status in (202, 429, 503):
        delay = refusal.retry_after if refusal.retry_after is not None else DEFAULT_RETRY_AFTER
        headers["Retry-After"] = str(max(0, int(delay)))
    return headers


def refusal_response(request: Request, refusal: Refusal) -> Response:
    status = STATUS[refusal.code]
    if isinstance(refusal, StoreUnavailable):
        request.scope[STORE_UNAVAILABLE] = True
    return error_response(
        request,
        status,
        refusal.reason,
        refusal_headers(refusal, status),
        code=refusal.code.value,
    )


async def ca_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refusal)
    return refusal_response(request, exc)


async def store_error(request: Request, exc: Exception) -> Response:
    """A store error from a route that reads the store directly (the API's lists):
    translated the one way the authority does it (``ca.ports.translated``)."""
    assert isinstance(exc, StoreError)
    try:
        with translated():
            raise exc
    except Refusal as refusal:
        return refusal_response(request, refusal)
    raise exc  # not a refusal (a schema error): a bug, let it be a 500


async def request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return error_response(request, exc.status, str(exc))


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
    return error_response(request, 422, reason, code=Code.BAD_REQUEST.value)


HANDLERS = {
    Refusal: ca_error,
    StoreError: store_error,
    RequestError: request_error,
    HTTPException: http_error,
    RequestValidationError: validation_error,
}
