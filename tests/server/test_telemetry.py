"""What ``server/telemetry.py`` makes of each request, in one process: its id, its route
by template (never the raw path), its enrollment outcome, its refusal code and database
error counted once (``server/metrics.py``), and its JSON log line (``server/logs.py``)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import APIRouter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from estkit.ca.errors import Code, Refusal, SignerUnavailable
from estkit.ca.ports import translated
from estkit.server.errors import CODE_HEADER, HANDLERS
from estkit.server.est import EstRoutes
from estkit.server.logs import REQUEST_ID, JsonFormatter, log_config, request_id
from estkit.server.metrics import RequestMetrics
from estkit.server.telemetry import Enrollment, Exchange, Telemetry
from estkit.store import errors as store_errors


class Recorded:
    """``telemetry.RequestMetrics`` that keeps what it is told."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.exchanges: list[Exchange] = []

    def started(self) -> None:
        self.in_flight += 1

    def finished(self, exchange: Exchange) -> None:
        self.in_flight -= 1
        self.exchanges.append(exchange)


def _answering(status: int, code: str | None) -> Any:
    """An ASGI app that answers every request ``status`` (and ``code`` in its header)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-length", b"0")]
        if code is not None:
            headers.append((CODE_HEADER.lower().encode(), code.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    return app


def _api_routes() -> list[Any]:
    router = APIRouter(prefix="/api/v1")

    @router.get("/devices/{device_id}")
    def device(device_id: str) -> str:  # pragma: no cover - never called, only matched
        return device_id

    return list(router.routes)


def _telemetry(app: Any, metrics: Any) -> Telemetry:
    est = EstRoutes(
        None,  # type: ignore[arg-type]  # resolving a path asks no authority
        default_label="devices",
        max_request_bytes=65536,
        clock=lambda: dt.datetime.now(dt.UTC),
    )
    return Telemetry(
        app,
        est=est,
        routes=_api_routes(),
        labels=("devices", "held"),
        default_label="devices",
        metrics=metrics,
        access_lines=True,
    )


def _call(
    app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None
) -> list[dict[str, Any]]:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers or [],
        "client": ("192.0.2.7", 50000),
        "server": ("127.0.0.1", 7443),
        "scheme": "https",
        "http_version": "1.1",
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


LABELED = "/.well-known/est/{label}/"


@pytest.mark.parametrize(
    ("method", "path", "status", "code", "route", "enrollment"),
    [
        ("POST", "/.well-known/est/simpleenroll", 200, None,
         "/.well-known/est/simpleenroll", Enrollment("devices", "simpleenroll", "ok")),
        ("POST", "/.well-known/est/held/simpleenroll", 202, "approval-pending",
         LABELED + "simpleenroll", Enrollment("held", "simpleenroll", "pending")),
        ("POST", "/.well-known/est/devices/simplereenroll", 403, "revoked",
         LABELED + "simplereenroll", Enrollment("devices", "simplereenroll", "refused")),
        ("POST", "/.well-known/est/serverkeygen", 404, "not-found",
         "/.well-known/est/serverkeygen", Enrollment("devices", "serverkeygen", "refused")),
        ("POST", "/.well-known/est/no-such-label/simpleenroll", 404, "not-found",
         LABELED + "simpleenroll", None),
        ("GET", "/.well-known/est/simpleenroll", 405, None, "/.well-known/est/simpleenroll", None),
        ("GET", "/.well-known/est/anything/cacerts", 200, None, LABELED + "cacerts", None),
        ("GET", "/health", 200, None, "/health", None),
        ("GET", "/api/v1/devices/dev-1", 401, "token-invalid", "/api/v1/devices/{device_id}", None),
        ("GET", "/random/path/12345", 404, None, "unmatched", None),
    ],
    ids=[
        "ok/default-label", "pending/approval", "refused/reenroll", "refused/keygen-off",
        "refusal-only/unknown-label", "none/wrong-method", "none/cacerts", "none/health",
        "template/api-refused-before-routing", "unmatched/unknown-path",
    ],
)  # fmt: skip
def test_a_request_is_named_by_its_route_template_and_its_enrollment_outcome(
    method: str,
    path: str,
    status: int,
    code: str | None,
    route: str,
    enrollment: Enrollment | None,
) -> None:
    metrics = Recorded()
    _call(_telemetry(_answering(status, code), metrics), method, path)
    assert metrics.in_flight == 0
    [exchange] = metrics.exchanges
    assert (exchange.method, exchange.route, exchange.status) == (method, route, status)
    assert exchange.refusal == code
    assert exchange.enrollment == enrollment
    assert not exchange.database_error


def test_a_method_of_the_clients_own_is_other_and_a_code_not_ours_is_none() -> None:
    metrics = Recorded()
    _call(_telemetry(_answering(400, "made-up"), metrics), "BREW", "/health")
    [exchange] = metrics.exchanges
    assert (exchange.method, exchange.refusal) == ("other", None)


@pytest.mark.parametrize(
    ("offered", "kept"),
    [
        (b"trace-42.a_b", True),
        (b"A" * 64, True),
        (b"A" * 65, False),
        (b"", False),
        (b"has space", False),
        (b"semi;colon", False),
        ("ünï".encode(), False),
        (None, False),
    ],
    ids=["ok/sane", "ok/64", "new/65", "new/empty", "new/space", "new/semicolon",
         "new/non-ascii", "new/absent"],
)  # fmt: skip
def test_the_request_id_is_the_clients_when_sane_and_is_returned(
    offered: bytes | None, kept: bool
) -> None:
    headers = [(b"x-request-id", offered)] if offered is not None else []
    sent = _call(_telemetry(_answering(200, None), Recorded()), "GET", "/health", headers)
    returned = dict(sent[0]["headers"])[b"x-request-id"]
    if kept:
        assert returned == offered
    else:
        assert returned != offered and len(returned) == 24
        assert request_id(offered) != request_id(offered)  # new each time


def _failing_app() -> Starlette:
    async def database(_request: Request) -> Response:
        with translated():
            raise store_errors.Unavailable("database or disk is full")

    async def token(_request: Request) -> Response:
        raise SignerUnavailable("devices", "token removed")

    async def refused(_request: Request) -> Response:
        raise Refusal(Code.NAME_MISMATCH, "CN is not the device id")

    return Starlette(
        routes=[
            Route("/database", database),
            Route("/token", token),
            Route("/refused", refused),
        ],
        exception_handlers=HANDLERS,  # type: ignore[arg-type]
    )


@pytest.fixture
def metrics() -> Iterator[RequestMetrics]:
    yield RequestMetrics(labels=["devices"])


def _sample(metrics: RequestMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return found if found is not None else 0.0


def test_a_database_error_is_counted_once_apart_from_other_unavailable_refusals(
    metrics: RequestMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    app = _telemetry(_failing_app(), metrics)
    with caplog.at_level(logging.WARNING):
        for path in ("/database", "/token", "/refused", "/database"):
            _call(app, "GET", path)
    assert _sample(metrics, "estkit_database_errors_total") == 2
    assert _sample(metrics, "estkit_refusals_total", code="unavailable") == 3
    assert _sample(metrics, "estkit_refusals_total", code="name-mismatch") == 1
    assert _sample(metrics, "estkit_refusals_total", code="revoked") == 0  # there, at zero
    assert _sample(metrics, "estkit_http_requests_total", method="GET", route="/database",
                   status="503") == 2  # fmt: skip
    assert _sample(metrics, "estkit_http_requests_in_flight") == 0
    count = _sample(metrics, "estkit_http_request_duration_seconds_count", method="GET",
                    route="/refused")  # fmt: skip
    assert count == 1


def test_every_enrollment_series_exists_from_the_start(metrics: RequestMetrics) -> None:
    for operation in ("simpleenroll", "simplereenroll", "serverkeygen"):
        for outcome in ("ok", "pending", "refused"):
            labels = {"label": "devices", "operation": operation, "outcome": outcome}
            assert metrics.registry.get_sample_value("estkit_enrollments_total", labels) == 0


def _record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("estkit.ca", logging.WARNING, __file__, 1, message, args, exc_info)


def test_a_json_line_has_the_fields_and_the_request_id_and_stays_one_line() -> None:
    formatter = JsonFormatter()
    token = REQUEST_ID.set("req-1")
    try:
        line = formatter.format(_record("two\nlines %s", "here", exc=True))
    finally:
        REQUEST_ID.reset(token)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and entry["logger"] == "estkit.ca"
    assert entry["message"] == "two\nlines here"
    assert entry["request_id"] == "req-1"
    assert "ValueError: boom" in entry["exception"]
    assert dt.datetime.fromisoformat(entry["time"]).tzinfo is not None
    assert json.loads(formatter.format(_record("outside")))["request_id"] is None


def test_json_logging_replaces_every_formatter_and_text_keeps_uvicorns() -> None:
    text = log_config("text", level=logging.WARNING)
    assert "root" not in text and "estkit.access" not in text["loggers"]
    json_config = log_config("json", level=logging.DEBUG)
    assert all(f == {"()": JsonFormatter} for f in json_config["formatters"].values())
    assert json_config["root"] == {"handlers": ["default"], "level": logging.DEBUG}
    assert json_config["loggers"]["estkit.access"]["propagate"] is False
