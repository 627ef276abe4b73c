"""The EST routes in-process (no sockets): response path details that need a custom authority."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from estkit.ca.authority import Authority, Label
from estkit.server.config import load_config
from estkit.server.est import EstApp, EstRoutes
from estkit.server.wiring import build_authority, open_store
from estkit.store import PendingStatus
from estserver import run_estkit
from estutil import csr_der, new_key


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("routes") / "data"
    run_estkit("server", "init", "--data-dir", d)
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


def client_for(authority: Authority, *, max_bytes: int = 65536) -> AsgiClient:
    routes = EstRoutes(
        authority,
        default_label="devices",
        max_request_bytes=max_bytes,
        clock=lambda: dt.datetime.now(dt.UTC),
    )
    return AsgiClient(EstApp(routes, Starlette()))


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
