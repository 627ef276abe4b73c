"""A certificate and Basic together: Basic in answer to a 401 challenge, once (RFC 7030 3.2.3)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from client_fakes import BASE_URL, FakeClock, Pki, Server, text_response
from cryptography import x509

from estkit.client import (
    BasicAuth,
    ClientCertificate,
    Credentials,
    EstAuthError,
    EstClient,
    TrustAnchor,
)
from estkit.client.auth import asks_for_basic
from estkit.pki import certs, cms, csr, keys, names, wire
from testpki import cn_name

PREFIX = "/.well-known/est/devices"
BASIC = BasicAuth("dev-1", "s3cret")
CHALLENGE = {"WWW-Authenticate": 'Basic realm="est"'}


@pytest.fixture
def certificate(tmp_path: Path, ca: Pki) -> ClientCertificate:
    key = keys.generate_key("ec-p256")
    (tmp_path / "dev.pem").write_bytes(certs.certs_to_pem([ca.issue(key.public_key())]))
    (tmp_path / "dev.key").write_bytes(keys.key_to_pem(key))
    return ClientCertificate(tmp_path / "dev.pem", tmp_path / "dev.key")


def _client(transport: httpx.MockTransport, clock: FakeClock, ca: Pki, auth: Any) -> EstClient:
    return EstClient(
        BASE_URL,
        trust=TrustAnchor.from_certificates([ca.root]),
        auth=auth,
        transport=transport,
        sleep=clock.sleep,
        clock=clock,
        rng=random.Random(7),
    )


def _demanding_basic(ca: Pki, *, accept: bool = True) -> Any:
    """simpleenroll that wants Basic from everyone (as libest's server does by default)."""

    def answer(request: httpx.Request) -> httpx.Response:
        if not accept or request.headers.get("authorization") != BASIC.header:
            return text_response(401, "", **CHALLENGE)
        request_csr = x509.load_der_x509_csr(wire.decode_base64_body(request.content))
        leaf = ca.issue(request_csr.public_key(), subject=request_csr.subject)
        return httpx.Response(
            200,
            content=wire.encode_base64_body(cms.encode_certs_only([leaf])),
            headers={"Content-Type": wire.ENROLL_CONTENT_TYPE},
        )

    return answer


def _csr() -> x509.CertificateSigningRequest:
    return csr.build_csr(keys.generate_key("ec-p256"), subject=cn_name("dev-1"))


def _authorizations(server: Server) -> list[str | None]:
    return [r.headers.get("authorization") for r in server.requests]


def test_basic_beside_a_certificate_waits_for_the_challenge_then_goes_up_front(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki, certificate: Any
) -> None:
    server.on(f"{PREFIX}/simpleenroll", _demanding_basic(ca))
    auth = Credentials(certificate=certificate, basic=BASIC)
    with _client(transport, clock, ca, auth) as est:
        issued = est.simpleenroll(_csr())
        assert names.common_name(issued[0].subject) == "dev-1"
        est.simpleenroll(_csr())  # the server challenged once: no need to ask again
    assert _authorizations(server) == [None, BASIC.header, BASIC.header]
    assert clock.sleeps == []


def test_a_401_after_basic_was_sent_is_final_with_a_clear_error(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki, certificate: Any
) -> None:
    server.on(f"{PREFIX}/simpleenroll", _demanding_basic(ca, accept=False))
    auth = Credentials(certificate=certificate, basic=BASIC)
    with _client(transport, clock, ca, auth) as est, pytest.raises(EstAuthError) as caught:
        est.simpleenroll(_csr())
    assert _authorizations(server) == [None, BASIC.header]  # one retry, no loop
    assert caught.value.status == 401
    assert str(caught.value).endswith(
        "HTTP 401 Unauthorized (the server refused the Basic credentials)"
    )
    assert clock.sleeps == []


@pytest.mark.parametrize(
    ("auth", "authorizations", "hint"),
    [
        ("basic", [BASIC.header], "the server refused the Basic credentials"),
        ("certificate", [None], "the server asks for HTTP Basic: a user name and password"),
    ],
    ids=["fail/basic-alone-sent-up-front", "fail/certificate-alone-cannot-answer"],
)
def test_one_credential_alone_gets_one_request(
    server: Server,
    transport: httpx.MockTransport,
    clock: FakeClock,
    ca: Pki,
    certificate: Any,
    auth: str,
    authorizations: list[str | None],
    hint: str,
) -> None:
    server.on(f"{PREFIX}/simpleenroll", _demanding_basic(ca, accept=False))
    given = BASIC if auth == "basic" else certificate
    with _client(transport, clock, ca, given) as est, pytest.raises(EstAuthError) as caught:
        est.simpleenroll(_csr())
    assert _authorizations(server) == authorizations
    assert str(caught.value).endswith(f"({hint})")


def test_basic_alone_goes_up_front_to_servers_that_never_challenge(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    server.on(f"{PREFIX}/simpleenroll", _demanding_basic(ca))
    with _client(transport, clock, ca, BASIC) as est:
        est.simpleenroll(_csr())
    assert _authorizations(server) == [BASIC.header]


def test_a_401_that_asks_for_another_scheme_is_not_answered_with_basic(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki, certificate: Any
) -> None:
    server.on(
        f"{PREFIX}/simpleenroll",
        text_response(401, "token needed", **{"WWW-Authenticate": "Bearer"}),
    )
    auth = Credentials(certificate=certificate, basic=BASIC)
    with _client(transport, clock, ca, auth) as est, pytest.raises(EstAuthError) as caught:
        est.simpleenroll(_csr())
    assert _authorizations(server) == [None]
    assert str(caught.value).endswith(": token needed")


@pytest.mark.parametrize(
    ("status", "values", "asks"),
    [
        (401, ['Basic realm="est"'], True),
        (401, ["basic"], True),
        (401, ['Bearer realm="x", Basic realm="est"'], True),
        (401, ["Bearer", 'Basic realm="a, b"'], True),
        (401, ['Digest realm="basic"'], False),
        (401, [], False),
        (403, ['Basic realm="est"'], False),
    ],
    ids=[
        "ok/basic",
        "ok/lower-case",
        "ok/second-challenge",
        "ok/second-header",
        "fail/digest-realm-named-basic",
        "fail/no-header",
        "fail/not-401",
    ],
)
def test_asks_for_basic_reads_every_challenge(status: int, values: list[str], asks: bool) -> None:
    headers = httpx.Headers([("WWW-Authenticate", v) for v in values])
    assert asks_for_basic(status, headers) is asks


def test_credentials_take_each_kind_of_auth(certificate: ClientCertificate) -> None:
    assert Credentials.of(None) == Credentials()
    assert Credentials.of(certificate) == Credentials(certificate=certificate)
    assert Credentials.of(BASIC) == Credentials(basic=BASIC)
    both = Credentials(certificate=certificate, basic=BASIC)
    assert Credentials.of(both) is both
    with pytest.raises(TypeError, match="ClientCertificate, BasicAuth or Credentials"):
        Credentials.of(("u", "p"))  # type: ignore[arg-type]
    assert "s3cret" not in repr(both)


def test_a_401_without_a_body_gives_its_reason_from_the_header(clock: FakeClock, ca: Pki) -> None:
    """estkit's EST 401 has an empty body (Bouncy Castle leaves it unread) and its reason
    and code in headers; the client error still says why."""
    answer = httpx.Response(
        401,
        headers={
            "WWW-Authenticate": 'Basic realm="estkit"',
            "Estkit-Refusal-Code": "secret-invalid",
            "Estkit-Refusal-Reason": "enrollment secret not valid for this device",
        },
    )
    transport = httpx.MockTransport(lambda request: answer)
    auth = BasicAuth("dev-1", "wrong")
    with _client(transport, clock, ca, auth) as est, pytest.raises(EstAuthError) as caught:
        est.cacerts()
    assert caught.value.code == "secret-invalid"
    assert caught.value.reason == "enrollment secret not valid for this device"


@pytest.mark.parametrize(
    "csrattrs",
    [
        httpx.Response(200, content=b"<html>hello</html>", headers={"Content-Type": "text/html"}),
        httpx.Response(
            200, content=b"\x30\x03junk", headers={"Content-Type": "application/csrattrs"}
        ),
        httpx.Response(500, content=b"oops", headers={"Content-Type": "text/plain"}),
    ],
    ids=["html", "not-base64", "server-error"],
)
def test_an_odd_csrattrs_answer_leaves_the_csr_unbound(
    server: Server,
    transport: httpx.MockTransport,
    clock: FakeClock,
    ca: Pki,
    csrattrs: httpx.Response,
) -> None:
    """The probe for channel binding must not break enrollment against servers whose
    /csrattrs says nothing usable."""
    server.on(f"{PREFIX}/csrattrs", lambda request: csrattrs)
    server.on(f"{PREFIX}/simpleenroll", _demanding_basic(ca))
    key = keys.generate_key("ec-p256")
    passwords: list[str | None] = []

    def factory(password: str | None) -> x509.CertificateSigningRequest:
        passwords.append(password)
        return csr.build_csr(key, subject=cn_name("dev-1"))

    with _client(transport, clock, ca, BASIC) as est:
        issued = est.simpleenroll(factory)
    assert passwords == [None]
    assert issued[0].public_key() == key.public_key()
