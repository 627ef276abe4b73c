"""The portal's HTTP plumbing: templates, form bodies, security headers, cookies."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from estkit.server.portal.session import COOKIE_PATH

STATIC_DIR = Path(__file__).parent / "static"
# A sign-in or action form is a few hundred bytes; anything much larger is not ours.
MAX_FORM_BYTES = 16 * 1024
FORM_TYPE = "application/x-www-form-urlencoded"

# Every asset is the portal's own: no inline script or style, no other origin, no frames.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class FormTooLarge(Exception):
    pass


async def read_form(request: Request) -> dict[str, str]:
    """A urlencoded form body (the first value of each name); another media type is
    an empty form, which fails the CSRF check of any action."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormTooLarge
    if media_type != FORM_TYPE:
        return {}
    form: dict[str, str] = {}
    for name, value in parse_qsl(body.decode("utf-8", "replace"), max_num_fields=64):
        form.setdefault(name, value)
    return form


def _when(value: dt.datetime | None) -> str:
    return "—" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _query(params: Mapping[str, Any]) -> str:
    """``?a=1&b=2`` of the non-empty ``params``, or ``""``."""
    kept = {k: str(v) for k, v in params.items() if v not in (None, "")}
    return f"?{urlencode(kept)}" if kept else ""


def templates() -> Environment:
    env = Environment(
        loader=PackageLoader("estkit.server.portal", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["query"] = _query
    return env


def html(body: str, *, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)


def download(body: bytes, *, filename: str, media_type: str) -> Response:
    return Response(
        body,
        media_type=media_type,
        headers={**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{filename}"'},
    )


def set_cookie(
    response: Response,
    name: str,
    value: str,
    *,
    max_age: dt.timedelta,
    samesite: Literal["strict", "lax"] = "strict",
) -> None:
    """A cookie only the portal's pages over HTTPS send back, never readable by script,
    and never cross-site (``lax``: on top-level navigations from another site too, for
    a sign-in that comes back from an identity provider)."""
    response.set_cookie(
        name,
        value,
        max_age=int(max_age.total_seconds()),
        path=COOKIE_PATH,
        secure=True,
        httponly=True,
        samesite=samesite,
    )


def clear_cookie(response: Response, name: str) -> None:
    set_cookie(response, name, "", max_age=dt.timedelta(0))


def local_path(value: str | None) -> str:
    """Where to go after signing in: a portal path, never another site."""
    if value and value.startswith(COOKIE_PATH + "/") and "//" not in value and "\\" not in value:
        return value
    return COOKIE_PATH + "/"
