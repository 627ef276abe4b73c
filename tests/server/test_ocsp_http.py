"""OCSP's place in the server: ``[ocsp]`` in the config, the per-source signing budget,
and the plain-HTTP listener's bounds (no estkit server: the listener alone)."""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import re
import socket
import time
import tomllib
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

from estkit.server.config import DEFAULT_CONFIG, ConfigError, OcspConfig, parse_config
from estkit.server.crl_http import start_crl_listener
from estkit.server.limits import MAX_CONNECTIONS_PER_ADDRESS
from estkit.server.ocsp_http import OcspEndpoint, SourceBudget

DATA_DIR = Path("/srv/estkit")


def config_text() -> str:
    return DEFAULT_CONFIG.format(port=7443, public_host="est.example", crl_port=7444)


def parse(crl: dict[str, Any] | None = None, ocsp: dict[str, Any] | None = None) -> OcspConfig:
    data = copy.deepcopy(tomllib.loads(config_text()))
    data["crl"].update(crl or {})
    data.setdefault("ocsp", {}).update(ocsp or {})
    return parse_config(data, DATA_DIR).ocsp


# -- [ocsp] ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("crl", "ocsp", "url", "validity"),
    [
        ({}, {}, "http://est.example:7444/ocsp", dt.timedelta(days=7)),
        ({"validity": "1d"}, {}, "http://est.example:7444/ocsp", dt.timedelta(days=1)),
        ({}, {"validity": "4h"}, "http://est.example:7444/ocsp", dt.timedelta(hours=4)),
        ({"url": "http://crl.example/crl"}, {}, "http://crl.example/ocsp", dt.timedelta(days=7)),
        ({}, {"url": "http://ocsp.example/"}, "http://ocsp.example", dt.timedelta(days=7)),
        ({}, {"url": ""}, "", dt.timedelta(days=7)),
        ({"url": ""}, {}, "", dt.timedelta(days=7)),
        ({"http_port": 0}, {}, "", dt.timedelta(days=7)),
    ],
    ids=[
        "ok/default-from-crl-url",
        "ok/validity-follows-crl",
        "ok/own-validity",
        "ok/crl-url-elsewhere",
        "ok/own-url",
        "ok/empty-url-is-none",
        "ok/no-crl-url-no-default",
        "ok/no-listener-no-default",
    ],
)
def test_ocsp_url_defaults_to_the_crl_listeners_and_validity_to_the_crls(
    crl: dict[str, Any], ocsp: dict[str, Any], url: str, validity: dt.timedelta
) -> None:
    assert parse(crl, ocsp) == OcspConfig(url=url, validity=validity)


@pytest.mark.parametrize(
    ("ocsp", "field"),
    [
        ({"url": "ftp://x/ocsp"}, "ocsp.url"),
        ({"url": 5}, "ocsp.url"),
        ({"validity": "1s"}, "ocsp.validity"),
        ({"validity": "soon"}, "ocsp.validity"),
        ({"validty": "1d"}, "ocsp.validty"),
    ],
    ids=[
        "fail/not-http",
        "fail/not-a-string",
        "fail/too-short",
        "fail/not-a-duration",
        "fail/typo",
    ],
)
def test_bad_ocsp_settings_are_refused_naming_the_field(ocsp: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        parse(ocsp=ocsp)


def test_the_commented_ocsp_settings_of_the_default_config_parse() -> None:
    text = re.sub(r"^# ((url|validity) = .*)$", r"\1", config_text(), flags=re.M)
    section = text[text.index("[ocsp]") : text.index("\n[", text.index("[ocsp]"))]
    assert 'url = "http://est.example:7444/ocsp"' in section and 'validity = "7d"' in section
    config = parse_config(tomllib.loads(text.replace("{{", "{").replace("}}", "}")), DATA_DIR)
    assert config.ocsp == OcspConfig(url="http://est.example:7444/ocsp")


# -- the signing budget per source ---------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_source_spends_its_burst_then_its_rate() -> None:
    clock = Clock()
    budget = SourceBudget(rate=2, burst=3, clock=clock)

    assert [budget.take("a") for _ in range(4)] == [True, True, True, False]
    assert budget.take("b")  # another source has its own
    clock.now += 0.5  # one token back
    assert [budget.take("a") for _ in range(2)] == [True, False]
    clock.now += 60  # never more than the burst
    assert [budget.take("a") for _ in range(4)] == [True, True, True, False]


def test_the_budget_remembers_at_most_max_sources() -> None:
    clock = Clock()
    budget = SourceBudget(rate=1, burst=1, max_sources=2, clock=clock)
    assert budget.take("a") and not budget.take("a")
    budget.take("b")
    budget.take("c")  # "a" is forgotten: it starts again with a full bucket
    assert budget.take("a")


@pytest.mark.parametrize(
    "kwargs",
    [{"rate": 0}, {"burst": 0.5}, {"max_sources": 0}],
    ids=["fail/no-rate", "fail/no-burst", "fail/no-sources"],
)
def test_the_budget_refuses_bounds_that_cannot_work(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SourceBudget(**kwargs)  # type: ignore[arg-type]


class Recorder:
    """A responder that says which requests it would have signed."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []

    def respond(
        self, request: bytes, *, now: dt.datetime, admit: Callable[[], bool] = lambda: True
    ) -> bytes:
        self.requests.append(request)
        return b"signed" if admit() else b"try later"


def test_the_endpoint_counts_each_source_apart_and_ipv6_by_its_64() -> None:
    clock = Clock()
    endpoint = OcspEndpoint(
        Recorder(),
        lambda: dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        budget=SourceBudget(rate=1, burst=1, clock=clock),
    )

    assert endpoint.answer(b"r", source="2001:db8::1") == b"signed"
    assert endpoint.answer(b"r", source="2001:db8::2") == b"try later"  # the same /64
    assert endpoint.answer(b"r", source="192.0.2.1") == b"signed"


def test_a_get_path_that_is_not_a_request_is_answered_without_the_responder() -> None:
    recorder = Recorder()
    endpoint = OcspEndpoint(recorder, lambda: dt.datetime(2026, 1, 1, tzinfo=dt.UTC))

    answer = endpoint.answer_get("%%%not-base64", source="192.0.2.1")

    assert answer == bytes.fromhex("30030a0101")  # OCSPResponse { malformedRequest }
    assert recorder.requests == []


# -- the listener's bounds -------------------------------------------------------------------------


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "devices.crl").write_bytes(b"crl")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = start_crl_listener(tmp_path, "127.0.0.1", port)
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()


def _get(port: int, path: str = "/crl/devices.crl") -> int:
    """The status of a GET; 0 when the connection was closed unanswered."""
    conn = HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        reply.read()
        return reply.status
    except ConnectionError:
        return 0
    finally:
        conn.close()


def test_connections_from_one_source_beyond_the_limit_are_closed_unanswered(listener: int) -> None:
    held = [
        socket.create_connection(("127.0.0.1", listener))
        for _ in range(MAX_CONNECTIONS_PER_ADDRESS)
    ]
    try:
        # A request on each, so that every one is being served by a thread now.
        for sock in held:
            sock.sendall(b"GET /crl/devices.crl HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        with (
            socket.create_connection(("127.0.0.1", listener), timeout=5) as extra,
            contextlib.suppress(ConnectionResetError),  # closed, or reset: unanswered
        ):
            extra.sendall(b"GET /crl/devices.crl HTTP/1.1\r\nHost: x\r\n\r\n")
            assert extra.recv(4096) == b""
    finally:
        for sock in held:
            sock.close()
    # Freed as the held connections end: served again.
    deadline = time.monotonic() + 5
    while _get(listener) != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _get(listener) == 200


def test_without_a_responder_ocsp_is_not_served(listener: int) -> None:
    assert _get(listener, "/ocsp/MAA=") == 404
    conn = HTTPConnection("127.0.0.1", listener, timeout=5)
    try:
        conn.request("POST", "/ocsp", body=b"0")
        assert conn.getresponse().status == 404
    finally:
        conn.close()
