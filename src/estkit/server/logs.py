"""The server's log lines: uvicorn's text, or JSON (``[server] log_format = "json"``).

JSON: one object per line, from every process (the supervisor and each worker) and
every logger (estkit's and uvicorn's): ``time`` (UTC, ISO 8601), ``level``,
``logger``, ``message``, ``request_id`` (null outside a request) and, on access
lines (``[server] access_log = true``, logger ``estkit.access``), ``method``,
``route`` (the route's template, never the query string), ``path``, ``status``,
``duration_ms``, ``client`` and the refusal ``code`` when there is one.

Every request has an id (``request_id``): the client's ``X-Request-ID`` when it is
1-64 characters of ``[A-Za-z0-9._-]``, else a new random one; the response carries
it back (``server/telemetry.py``). Nothing of a request's headers, query string or
body is logged: credentials (Basic secrets, API tokens, session cookies) travel there.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import secrets
from contextvars import ContextVar
from typing import Any

from estkit.server.tls import uvicorn_log_config

# The id of the request being served, for every log line written while it is.
REQUEST_ID: ContextVar[str | None] = ContextVar("estkit_request_id", default=None)
ACCESS_LOGGER = "estkit.access"
REQUEST_ID_HEADER = b"x-request-id"
_SANE_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")


def request_id(offered: bytes | None) -> str:
    """The id of a request: ``offered`` (its ``X-Request-ID``) when sane, else a new one."""
    if offered is not None and _SANE_ID.fullmatch(offered):
        return offered.decode("ascii")
    return secrets.token_hex(12)


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON (module docstring); ``record.access``: the fields of
    an access line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": REQUEST_ID.get(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


class WithoutQuery(logging.Filter):
    """uvicorn's access record (client, method, target, version, status) without the
    target's query string."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (args[0], args[1], args[2].split("?", 1)[0], args[3], args[4])
        return True


def log_config(log_format: str, *, level: int) -> dict[str, Any]:
    """uvicorn's ``log_config`` (a ``logging.config.dictConfig`` dict), applied by the
    supervisor and again by each worker it spawns.

    ``text``: uvicorn's own (``tls.uvicorn_log_config``). ``json``: its handlers (stderr,
    and stdout for access lines) write ``JsonFormatter`` lines, the root logger too, at
    ``level`` (the command's, so ``-v`` still shows debug lines), and ``estkit.access``
    takes uvicorn's place for access lines (``serve`` turns uvicorn's off).
    """
    config = uvicorn_log_config()
    if log_format != "json":
        # uvicorn's access lines carry the whole target: its query (an OIDC sign-in's
        # one-time code and state, say) is cut off, as in estkit's own access lines.
        config.setdefault("filters", {})["no_query"] = {"()": WithoutQuery}
        config["handlers"]["access"].setdefault("filters", []).append("no_query")
        return config
    for name in ("default", "access"):
        config["formatters"][name] = {"()": JsonFormatter}
    config["loggers"][ACCESS_LOGGER] = {"handlers": ["access"], "level": "INFO", "propagate": False}
    config["root"] = {"handlers": ["default"], "level": level}
    return config
