"""The EST routes in-process (no sockets): response path details that need a custom authority."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from backends import server_database
from estkit.ca.authority import Authority, Label, Principal
from estkit.ca.errors import Code, Refusal
from estkit.server.config import load_config
from estkit.server.errors import CODE_HEADER
from estkit.server.est import EstApp, EstAuthority, EstRoutes
from estkit.server.limits import BasicCheckPool, BasicLimits
from estkit.server.wiring import build_authority, open_store
from estkit.store import PendingStatus
from estserver import run_estkit
from estutil import csr_der, new_key


@pytest.fixture(scope="module")
def data_dir(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    d = tmp_path_factory.mktemp("routes") / "data"
    database = server_database(request, backend)
    run_estkit(
        "server", "init", "--data-dir", d, *(["--database-url", database] if database else [])
    )
    return d


@pytest.fixture
def authority(data_dir: Path) -> Iterator[Authority]:
    config = load_config(data_dir)
    store = open_store(config)
    yield build_authority(config, store)
    store.close()


class AsgiClient:
    """Sync calls into the ASGI app through httpx's ASGI transport: no sockets."""

    def __init__(self, app: EstApp) -> None:
        self.app = app

    def __enter__(self) -> AsgiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="https://est.test") as c:
                response = await c.request(method, url, **kwargs)
                await response.aread()
                return response

        return asyncio.run(call())

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


def client_for(
    authority: EstAuthority,
    *,
    max_bytes: int = 65536,
    basic_pool: BasicCheckPool | None = None,
    basic_limits: BasicLimits | None = None,
    refusal_delay: float = 0.0,
) -> AsgiClient:
    routes = EstRoutes(
        authority,
        default_label="devices",
        max_request_bytes=max_bytes,
        clock=lambda: dt.datetime.now(dt.UTC),
        basic_pool=basic_pool,
        basic_limits=basic_limits,
        refusal_delay=refusal_delay,
    )
    return AsgiClient(EstApp(routes, Starlette()))


class CountingAuthority:
    """The real authority, counting the secret checks (each one an scrypt)."""

    def __init__(self, inner: Authority) -> None:
        self.inner = inner
        self.secret_checks = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def authenticate_secret(self, device_id: str, secret: str, *, now: dt.datetime) -> Principal:
        self.secret_checks += 1
        return self.inner.authenticate_secret(device_id, secret, now=now)


def _manual_label(authority: Authority, name: str, retry_after: int) -> None:
    base = authority.labels["devices"]
    authority.labels[name] = replace(base, name=name, approval=True, retry_after=retry_after)


@pytest.mark.parametrize("approve", [True, False], ids=["ok/approved", "fail/denied"])
def test_manual_approval_answers_202_then_the_decision(authority: Authority, approve: bool) -> None:
    _manual_label(authority, "manual", 42)
    device = f"dev-pending-{approve}"
    secret = authority.add_device(device, actor="test", now=dt.datetime.now(dt.UTC))
    body = base64.b64encode(csr_der(new_key(), device))

    def enroll() -> httpx.Response:
        with client_for(authority) as client:
            return client.post(
                "/.well-known/est/manual/simpleenroll",
                content=body,
                headers={"Content-Type": "application/pkcs10"},
                auth=(device, secret),
            )

    first, second = enroll(), enroll()
    for response in (first, second):
        assert response.status_code == 202
        assert response.headers["retry-after"] == "42"
    pending = authority.store.list_pending(status=PendingStatus.PENDING).items
    mine = [p for p in pending if p.device_id == device]
    assert len(mine) == 1  # the retry found the same request
    # Pending does not consume the one-time secret: the retry must be able to use it.
    assert authority.store.usable_secrets(device, now=dt.datetime.now(dt.UTC))
    authority.decide(mine[0].id, approve=approve, actor="op", now=dt.datetime.now(dt.UTC))
    decided = enroll()
    if approve:
        assert decided.status_code == 200
        # The issuance consumed the one-time secret: it buys nothing more.
        assert enroll().status_code == 401
    else:
        assert decided.status_code == 403 and "denied" in decided.text


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (lambda b: b, {}),
        (lambda b: b + b"\n", {"Content-Transfer-Encoding": "base64"}),
        (lambda b: b"\r\n".join(b[i : i + 76] for i in range(0, len(b), 76)), {}),
        (lambda b: b, {"Content-Transfer-Encoding": "BASE64"}),
        (lambda b: b, {"Content-Transfer-Encoding": "binary"}),  # the value is ignored (RFC 8951)
    ],
    ids=["ok/one-line", "ok/final-newline-cte", "ok/crlf-76", "ok/cte-upper", "ok/cte-wrong"],
)
def test_enroll_body_encodings_are_all_accepted(authority: Authority, body, headers) -> None:  # type: ignore[no-untyped-def]
    device = f"dev-enc-{len(headers)}-{id(body) % 10000}"
    secret = authority.add_device(device, actor="test", now=dt.datetime.now(dt.UTC))
    with client_for(authority) as client:
        response = client.post(
            "/.well-known/est/simpleenroll",
            content=body(base64.b64encode(csr_der(new_key(), device))),
            headers={"Content-Type": "application/pkcs10", **headers},
            auth=(device, secret),
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-length"] == str(len(response.content))
    assert "transfer-encoding" not in response.headers


def test_body_over_limit_is_413_even_without_content_length(authority: Authority) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"A" * 1000

    with client_for(authority, max_bytes=4096) as client:
        response = client.post(
            "/.well-known/est/simpleenroll",
            content=chunks(),
            headers={"Content-Type": "application/pkcs10"},
            auth=("whoever", "x"),
        )
    assert response.status_code == 413


@pytest.mark.parametrize("line", [64, 76], ids=["ok/wrap-64", "ok/wrap-76"])
def test_label_line_length_wraps_responses(authority: Authority, line: int) -> None:
    label = authority.labels["devices"]
    authority.labels["wrapped"] = Label(
        name="wrapped", ca=label.ca, profile=label.profile, base64_line_length=line
    )
    with client_for(authority) as client:
        response = client.get("/.well-known/est/wrapped/cacerts")
    lines = response.content.splitlines()
    assert len(lines) > 1
    assert all(len(x) == line for x in lines[:-1]) and 0 < len(lines[-1]) <= line


def test_csrattrs_lists_configured_oids(authority: Authority) -> None:
    from estkit.pki.csrattrs import decode_csrattrs

    with client_for(authority) as client:
        response = client.get("/.well-known/est/csrattrs")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/csrattrs"
    attrs = decode_csrattrs(base64.b64decode(response.content))
    assert [a.oid.dotted_string for a in attrs] == ["1.2.840.10045.4.3.2"]


def test_csrattrs_without_oids_is_204(authority: Authority) -> None:
    label = authority.labels["devices"]
    authority.labels["plain"] = Label(name="plain", ca=label.ca, profile=label.profile)
    with client_for(authority) as client:
        response = client.get("/.well-known/est/plain/csrattrs")
    assert response.status_code == 204
    assert response.content == b""


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/.well-known/est/simpleenroll", 405, "POST"),
        ("POST", "/.well-known/est/devices/cacerts", 405, "GET"),
        ("GET", "/.well-known/est//cacerts", 404, None),
        ("GET", "/.well-known/est/a/b/cacerts", 404, None),
        ("GET", "/.well-known/est/nosuchop", 404, None),
        ("GET", "/.well-known/est/nosuchlabel/cacerts", 404, None),
        ("GET", "/health/nothing", 404, None),
        ("HEAD", "/health", 200, None),
    ],
)
def test_est_paths_and_methods(
    authority: Authority, method: str, path: str, status: int, allow: str | None
) -> None:
    """The EST front answers its own paths exactly, and leaves every other path alone."""
    with client_for(authority) as client:
        response = client.request(method, path)
    assert response.status_code == status
    assert response.headers.get("allow") == allow
    if status != 200 and method != "HEAD":
        assert response.text.count("\n") <= 1 and response.text.strip()


# -- HTTP Basic: what it may cost ---------------------------------------------------------

ENROLL = "/.well-known/est/simpleenroll"
PKCS10 = {"Content-Type": "application/pkcs10"}


def _csr_body(device_id: str) -> bytes:
    return base64.b64encode(csr_der(new_key(), device_id))


@pytest.mark.parametrize("known", [True, False], ids=["fail/wrong-secret", "fail/unknown-user"])
def test_repeated_wrong_secrets_get_429_before_scrypt(authority: Authority, known: bool) -> None:
    """Finding 2: 60 wrong secrets in a row all got 401. Now the sixth gets 429 with
    Retry-After, answered before the secret is checked, alike for a device that
    exists and one that does not."""
    device = f"dev-guess-{known}"
    if known:
        authority.add_device(device, actor="test", now=dt.datetime.now(dt.UTC))
    counting = CountingAuthority(authority)
    body = _csr_body(device)
    with client_for(counting, basic_limits=BasicLimits(per_username_and_source=5)) as client:
        answers = [
            client.post(ENROLL, content=body, headers=PKCS10, auth=(device, f"guess-{i}"))
            for i in range(8)
        ]
    assert [a.status_code for a in answers] == [401] * 5 + [429] * 3
    assert counting.secret_checks == 5  # the limited ones cost no scrypt
    limited = answers[-1]
    assert limited.headers[CODE_HEADER] == "rate-limited"
    assert 290 <= int(limited.headers["retry-after"]) <= 300
    assert limited.text.count("\n") == 1
    assert answers[0].headers[CODE_HEADER] == "secret-invalid"


def test_one_source_is_limited_across_usernames(authority: Authority) -> None:
    counting = CountingAuthority(authority)
    limits = BasicLimits(per_username_and_source=5, per_source=3)
    with client_for(counting, basic_limits=limits) as client:
        statuses = [
            client.post(ENROLL, content=_csr_body(f"nobody-{i}"), headers=PKCS10,
                        auth=(f"nobody-{i}", "x")).status_code
            for i in range(5)
        ]  # fmt: skip
    assert statuses == [401, 401, 401, 429, 429]
    assert counting.secret_checks == 3


def test_a_limited_basic_request_is_answered_after_the_refusal_delay(
    authority: Authority,
) -> None:
    """A client that waits for its answers sends one limited request per connection per
    delay, not thousands a second (bench/README.md, the Basic flood)."""
    limits = BasicLimits(per_username_and_source=1)
    body = _csr_body("dev-slowed")
    with client_for(authority, basic_limits=limits, refusal_delay=0.3) as client:
        first = client.post(ENROLL, content=body, headers=PKCS10, auth=("dev-slowed", "x"))
        started = time.monotonic()
        limited = client.post(ENROLL, content=body, headers=PKCS10, auth=("dev-slowed", "x"))
        waited = time.monotonic() - started
    assert (first.status_code, limited.status_code) == (401, 429)
    assert waited >= 0.3


@pytest.mark.parametrize(
    ("path", "headers", "content", "status", "code"),
    [
        (ENROLL, {"Content-Type": "text/plain"}, b"AAAA", 415, None),
        (ENROLL, PKCS10, b"A" * 70_000, 413, None),
        (ENROLL, PKCS10, b"not base64 at all!", 400, "bad-csr"),
        ("/.well-known/est/simplereenroll", PKCS10, b"AAAA", 403, "certificate-required"),
    ],
    ids=["fail/media-type", "fail/too-large", "fail/not-base64", "fail/reenroll-with-basic"],
)
def test_the_request_is_checked_before_a_secret_costs_scrypt(
    authority: Authority,
    path: str,
    headers: dict[str, str],
    content: bytes,
    status: int,
    code: str | None,
) -> None:
    counting = CountingAuthority(authority)
    with client_for(counting) as client:
        response = client.post(path, content=content, headers=headers, auth=("dev-x", "secret"))
    assert response.status_code == status, response.text
    assert response.headers.get(CODE_HEADER) == code
    assert counting.secret_checks == 0


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer abc", "Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode()],
    ids=["fail/none", "fail/bearer", "fail/not-base64", "fail/no-colon"],
)
def test_missing_or_malformed_credentials_get_a_basic_challenge(
    authority: Authority, authorization: str | None
) -> None:
    headers = dict(PKCS10)
    if authorization is not None:
        headers["Authorization"] = authorization
    with client_for(authority) as client:
        response = client.post(ENROLL, content=_csr_body("dev-x"), headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Basic realm="estkit"'
    assert response.headers[CODE_HEADER] == "authentication-required"


class BlockingAuthority:
    """Secret checks that wait for ``release`` (a stand-in for slow scrypt)."""

    def __init__(self, inner: Authority) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.started = threading.Event()
        self.secret_checks = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def authenticate_secret(self, device_id: str, secret: str, *, now: dt.datetime) -> Principal:
        self.secret_checks += 1
        self.started.set()
        self.release.wait(10)
        raise Refusal(Code.SECRET_INVALID, "enrollment secret not valid for this device")


def test_a_full_basic_pool_answers_503_without_scrypt(authority: Authority) -> None:
    blocking = BlockingAuthority(authority)
    pool = BasicCheckPool(threads=1, queue=1, retry_after=2)
    routes = EstRoutes(
        blocking,
        default_label="devices",
        max_request_bytes=65536,
        clock=lambda: dt.datetime.now(dt.UTC),
        basic_pool=pool,
        basic_limits=BasicLimits(per_username_and_source=100, per_username=100, per_source=100),
        refusal_delay=0.0,
    )
    app = EstApp(routes, Starlette())

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://est.test") as c:

            def post(i: int) -> Awaitable[httpx.Response]:
                return c.post(ENROLL, content=_csr_body(f"d{i}"), headers=PKCS10,
                              auth=(f"d{i}", "x"))  # fmt: skip

            held = [asyncio.ensure_future(post(i)) for i in range(2)]  # running, waiting
            await asyncio.to_thread(blocking.started.wait, 10)
            for _ in range(100):  # bounded: until both are in the pool
                if pool.in_flight == 2:
                    break
                await asyncio.sleep(0.01)
            refused = await post(3)
            blocking.release.set()
            return [refused, *[await h for h in held]]

    try:
        refused, *held = asyncio.run(main())
    finally:
        blocking.release.set()
        pool.shutdown()
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "2"
    assert refused.headers[CODE_HEADER] == "unavailable"
    assert [r.status_code for r in held] == [401, 401]
    assert blocking.secret_checks == 2


# -- a client that goes away mid-body -----------------------------------------------------


def _disconnecting(body: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    """An ASGI ``receive``: part of the body, then the client is gone."""
    messages = [
        {"type": "http.request", "body": body, "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if len(messages) > 1 else messages[0]

    return receive


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("192.0.2.9", 50000),
        "server": ("127.0.0.1", 7443),
    }


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        (ENROLL, [(b"content-type", b"application/pkcs10"), (b"content-length", b"5000")]),
        ("/api/v1/devices", [(b"content-type", b"application/json"),
                             (b"content-length", b"5000")]),
    ],
    ids=["est", "api"],
)  # fmt: skip
def test_a_client_gone_mid_body_is_one_log_line_without_traceback(
    data_dir: Path, path: str, headers: list[tuple[bytes, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 7: a ~22-line ClientDisconnect traceback per such request. (FastAPI turns
    it into a 400 of its own on the API; EST reads its body itself.)"""
    from estkit.server.app import create_app

    app = create_app(load_config(data_dir))
    if path == ENROLL:  # an enrollment secret, checked once the body is in
        authorization = b"Basic " + base64.b64encode(b"dev:secret")
    else:  # the API reads the body once the token is accepted
        token = run_estkit(
            "token", "create", "--data-dir", data_dir, "--name", "gone", "--scope", "admin"
        ).stdout.strip()
        authorization = f"Bearer {token}".encode()
    headers = [*headers, (b"authorization", authorization)]
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    with caplog.at_level(logging.INFO):
        asyncio.run(app(_scope("POST", path, headers), _disconnecting(b"x" * 100), send))  # type: ignore[arg-type]
    # Nothing escapes to uvicorn (which would log the traceback); at most one line here.
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(records) <= 1, [r.getMessage() for r in records]
    assert all(r.exc_info is None for r in records)
    assert all("192.0.2.9" in r.getMessage() and path in r.getMessage() for r in records)
