"""What every HTTP request leaves behind: its id, its metrics, and (JSON logs) its access line.

``Telemetry`` is a plain ASGI middleware around the whole application (``EstApp``
and the API behind it), so that EST, the API, the portal and the CRL route are
seen alike and exactly once. Per request it

- sets the request id (``logs.request_id``) for every log line written while the
  request is served, and returns it in ``X-Request-ID``;
- names the route by its template (``/.well-known/est/{label}/simpleenroll``,
  ``/api/v1/devices/{device_id}``), never by the raw path, so that no client can
  make a metric series or a log field of its own;
- reads the refusal code from the response (``server/errors.py`` puts every
  code in ``Estkit-Refusal-Code``, once per response) and whether the refusal was
  a database error (``errors.STORE_UNAVAILABLE``);
- hands all that to ``RequestMetrics`` (``server/metrics.py``), if metrics are on,
  and writes the access line, if JSON access lines are on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from estkit.ca.errors import Code
from estkit.server.config import ServerConfig
from estkit.server.errors import CODE_HEADER, STORE_UNAVAILABLE
from estkit.server.est import PREFIX, EstApp, EstRoutes
from estkit.server.logs import ACCESS_LOGGER, REQUEST_ID, REQUEST_ID_HEADER, request_id

access_log = logging.getLogger(ACCESS_LOGGER)

# The operations that issue a certificate, counted as enrollments per label.
ENROLLMENTS = ("simpleenroll", "simplereenroll", "serverkeygen")
OUTCOMES = ("ok", "pending", "refused")
# Any other method is "other": the method is the client's to choose.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
# The status of a request whose client left before any response was started.
CLIENT_GONE = 499
_CODES = frozenset(code.value for code in Code)
_CODE_HEADER = CODE_HEADER.lower().encode("latin-1")
_PATH_LIMIT = 256


@dataclass(frozen=True, slots=True)
class Enrollment:
    """An EST request for a certificate: its label (a configured one), operation, outcome."""

    label: str
    operation: str
    outcome: str  # ok (200), pending (202, approval), refused (anything else)


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request and its response, as the metrics count them."""

    method: str
    route: str
    status: int
    seconds: float
    refusal: str | None  # the refusal code the response carried
    database_error: bool
    enrollment: Enrollment | None


class RequestMetrics(Protocol):
    """What ``Telemetry`` needs from the metrics (``metrics.RequestMetrics`` is one)."""

    def started(self) -> None: ...
    def finished(self, exchange: Exchange) -> None: ...


class Telemetry:
    """The ASGI middleware around the whole application (module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        est: EstRoutes,
        routes: Sequence[BaseRoute],
        labels: Collection[str],
        default_label: str,
        metrics: RequestMetrics | None,
        access_lines: bool,
    ) -> None:
        """``routes``: the API's (FastAPI's router), to name the route of a request
        refused before it was routed; ``labels``: the configured EST labels (enrollments
        under any other name are refusals only); ``access_lines``: log one per request."""
        self.app = app
        self._est = est
        self._routes = routes
        self._labels = frozenset(labels)
        self._default_label = default_label
        self._metrics = metrics
        self._access_lines = access_lines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(_header(scope["headers"], REQUEST_ID_HEADER))
        token = REQUEST_ID.set(rid)
        metrics = self._metrics
        if metrics is not None:
            metrics.started()
        start = time.perf_counter()
        status = 0
        code: str | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status, code
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                found = _header(headers, _CODE_HEADER)
                code = found.decode("latin-1") if found is not None else None
                headers.append((REQUEST_ID_HEADER, rid.encode("ascii")))
                message = {**message, "headers": headers}
            await send(message)

        failed = True
        try:
            await self.app(scope, receive, send_with_id)
            failed = False
        finally:
            seconds = time.perf_counter() - start
            if not status:
                status = 500 if failed else CLIENT_GONE
            try:
                self._finished(scope, status, code if code in _CODES else None, seconds)
            finally:
                REQUEST_ID.reset(token)

    def _finished(self, scope: Scope, status: int, code: str | None, seconds: float) -> None:
        if self._metrics is None and not self._access_lines:
            return  # the request id was all there was to do
        method = scope["method"] if scope["method"] in METHODS else "other"
        route, enrollment = self._route(scope, method, status)
        if self._metrics is not None:
            self._metrics.finished(
                Exchange(
                    method=method,
                    route=route,
                    status=status,
                    seconds=seconds,
                    refusal=code,
                    database_error=bool(scope.get(STORE_UNAVAILABLE)),
                    enrollment=enrollment,
                )
            )
        if self._access_lines:
            client = scope.get("client")
            fields: dict[str, Any] = {
                "method": method,
                "route": route,
                "path": scope["path"][:_PATH_LIMIT],
                "status": status,
                "duration_ms": round(seconds * 1000, 3),
                "client": f"{client[0]}:{client[1]}" if client else None,
            }
            if code is not None:
                fields["code"] = code
            access_log.info("%s %s %d", method, route, status, extra={"access": fields})

    def _route(self, scope: Scope, method: str, status: int) -> tuple[str, Enrollment | None]:
        """The route's template, and the enrollment when the request was one."""
        path = scope["path"]
        found = self._est.resolve(path)
        if found is not None:
            label = found[2]
            if not path.startswith(PREFIX + "/"):
                return path, None  # the health checks: fixed paths
            operation = path.rpartition("/")[2]
            route = f"{PREFIX}/{{label}}/{operation}" if label else f"{PREFIX}/{operation}"
            label = label or self._default_label
            if operation not in ENROLLMENTS or method != "POST" or label not in self._labels:
                return route, None
            outcome = "ok" if status == 200 else "pending" if status == 202 else "refused"
            return route, Enrollment(label=label, operation=operation, outcome=outcome)
        return _template(scope, scope.get("route")) or self._matching(scope), None

    def _matching(self, scope: Scope) -> str:
        """The template of the route that would have taken a request answered before it
        was routed (a 401 from ``ApiAuthentication``), or ``unmatched``."""
        probe = dict(scope)
        for candidate in self._routes:
            match, child = candidate.matches(probe)
            if match is not Match.NONE and (found := _template({**probe, **child}, candidate)):
                return found
        return UNMATCHED


def _template(scope: Scope, route: Any) -> str | None:
    """The template of ``route``, the innermost route that took the request. A mount's
    own template covers its subtree (``/api/static/{path}``); a route inside a mount
    is under the mount's path, which routing left in ``root_path``."""
    path_format = getattr(route, "path_format", None)
    if not isinstance(path_format, str):
        return None
    if isinstance(route, Mount):
        return path_format
    return f"{scope.get('root_path', '')}{path_format}"


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case, as ASGI gives names), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def instrument(config: ServerConfig, app: EstApp, *, api_routes: Sequence[BaseRoute]) -> Telemetry:
    """``app`` with its requests' ids, metrics (``[metrics] port``) and JSON access lines
    (``[server] access_log`` with ``log_format = "json"``; uvicorn writes the text ones).
    ``api_routes``: the API's routes, behind ``app``."""
    metrics: RequestMetrics | None = None
    if config.metrics.port:
        # Imported here, not above: prometheus-client must not be imported before
        # ``serve`` has named the directory of this run's metric files (metric_files.py).
        from estkit.server.metrics import RequestMetrics as PrometheusMetrics

        metrics = PrometheusMetrics(labels=config.labels)
    return Telemetry(
        app,
        est=app.routes,
        routes=api_routes,
        labels=config.labels,
        default_label=config.default_label,
        metrics=metrics,
        access_lines=config.access_log and config.log_format == "json",
    )
