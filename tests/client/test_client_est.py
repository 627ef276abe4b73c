"""EstClient against a scripted server: wire format, retries, Retry-After, errors, bootstrap."""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import random
import ssl
import time
from typing import Any

import httpx
import pytest
from client_fakes import (
    BASE_URL,
    NOW,
    FakeClock,
    Pki,
    Server,
    certs_body,
    pkcs7_response,
    text_response,
)
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
)
from cryptography.x509.oid import NameOID

from estkit.client import (
    BasicAuth,
    ClientCertificate,
    CredentialError,
    EnrollmentPending,
    EstAuthError,
    EstClient,
    EstConnectionError,
    EstHttpError,
    EstNotFoundError,
    EstProtocolError,
    IssuedCertificateError,
    TrustAnchor,
    TrustAnchorError,
)
from estkit.client import est as est_module
from estkit.pki import certs, cms, csr, csrattrs, keys, profiles, wire

PREFIX = "/.well-known/est/devices"


def client(
    transport: httpx.MockTransport,
    clock: FakeClock,
    ca: Pki,
    **kwargs: Any,
) -> EstClient:
    kwargs.setdefault("trust", TrustAnchor.from_certificates([ca.root]))
    kwargs.setdefault("rng", random.Random(7))
    return EstClient(BASE_URL, transport=transport, sleep=clock.sleep, clock=clock, **kwargs)


def new_csr(cn: str = "dev-1") -> tuple[keys.PrivateKey, x509.CertificateSigningRequest]:
    key = keys.generate_key("ec-p256")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return key, csr.build_csr(key, subject=name)


def issue_from_request(ca: Pki, *, extra: tuple[x509.Certificate, ...] = ()) -> Any:
    def answer(request: httpx.Request) -> httpx.Response:
        der = wire.decode_base64_body(request.content)
        parsed = x509.load_der_x509_csr(der)
        leaf = ca.issue(parsed.public_key(), subject=parsed.subject)
        return pkcs7_response([leaf, *extra])

    return answer


# -- response decoding -----------------------------------------------------------


@pytest.mark.parametrize(
    ("line_length", "newline", "content_type"),
    [
        (0, b"\n", "application/pkcs7-mime"),
        (64, b"\n", "application/pkcs7-mime; smime-type=certs-only"),
        (76, b"\r\n", "Application/PKCS7-MIME ; smime-type=certs-only"),
        (64, b"\n", 'application/pkcs7-mime; smime-type="certs-only"; name=cacerts.p7c'),
    ],
    ids=["ok/one-line", "ok/wrapped-64", "ok/wrapped-76-crlf-mixed-case", "ok/more-params"],
)
def test_cacerts_decodes_wrapped_and_unwrapped_bodies_of_any_parameters(
    server: Server,
    transport: httpx.MockTransport,
    clock: FakeClock,
    ca: Pki,
    line_length: int,
    newline: bytes,
    content_type: str,
) -> None:
    body = wire.encode_base64_body(
        cms.encode_certs_only([ca.issuing, ca.root]), line_length=line_length, newline=newline
    )
    server.on(
        f"{PREFIX}/cacerts",
        httpx.Response(200, content=body, headers={"Content-Type": content_type}),
    )
    with client(transport, clock, ca) as est:
        assert est.cacerts() == [ca.issuing, ca.root]
    assert server.paths() == [f"GET {PREFIX}/cacerts"]


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (
            httpx.Response(
                200, content=b"AAAA", headers={"Content-Type": "application/octet-stream"}
            ),
            "expected application/pkcs7-mime, got application/octet-stream",
        ),
        (httpx.Response(200, content=b"AAAA"), "got no Content-Type"),
        (
            httpx.Response(200, content=b"not base64!", headers={"Content-Type": wire.PKCS7_MIME}),
            "not valid base64",
        ),
        (
            httpx.Response(200, content=b"", headers={"Content-Type": wire.PKCS7_MIME}),
            "empty body",
        ),
        (
            httpx.Response(200, content=b"MAMCAQA=", headers={"Content-Type": wire.PKCS7_MIME}),
            "not a certs-only CMS",
        ),
        (
            httpx.Response(
                200,
                stream=httpx.ByteStream(b"not gzip"),
                headers={"Content-Type": wire.PKCS7_MIME, "Content-Encoding": "gzip"},
            ),
            "while decompressing data",
        ),
        (
            httpx.Response(
                200, content=b"A" * (2 << 20), headers={"Content-Type": wire.PKCS7_MIME}
            ),
            "larger than",
        ),
        (httpx.Response(204), "unexpected HTTP 204"),
        (httpx.Response(202, headers={"Retry-After": "1"}), "unexpected HTTP 202"),
    ],
    ids=[
        "fail/wrong-media-type",
        "fail/no-content-type",
        "fail/bad-base64",
        "fail/empty-body",
        "fail/not-cms",
        "fail/bad-content-encoding",
        "fail/oversized",
        "fail/unexpected-204",
        "fail/202-outside-enrollment",
    ],
)
def test_cacerts_rejects_responses_that_are_not_est(
    server: Server,
    transport: httpx.MockTransport,
    clock: FakeClock,
    ca: Pki,
    response: httpx.Response,
    message: str,
) -> None:
    server.on(f"{PREFIX}/cacerts", response)
    with client(transport, clock, ca) as est, pytest.raises(EstProtocolError, match=message):
        est.cacerts()
    assert clock.sleeps == []


# -- enrollment requests ---------------------------------------------------------


@pytest.mark.parametrize("operation", ["simpleenroll", "simplereenroll"])
def test_enroll_sends_csr_as_wrapped_base64_pkcs10_with_length(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki, operation: str
) -> None:
    server.on(f"{PREFIX}/{operation}", issue_from_request(ca, extra=(ca.issuing,)))
    key, request_csr = new_csr()
    with client(transport, clock, ca) as est:
        issued = getattr(est, operation)(request_csr)
    (request,) = server.requests
    assert request.method == "POST"
    assert request.url == f"{BASE_URL}/{operation}"
    assert request.headers["content-type"] == "application/pkcs10"
    assert request.headers["content-transfer-encoding"] == "base64"
    assert int(request.headers["content-length"]) == len(request.content)
    assert "transfer-encoding" not in request.headers
    assert request.content.endswith(b"\n")
    lines = request.content.split(b"\n")[:-1]
    assert all(len(line) == 64 for line in lines[:-1]) and 0 < len(lines[-1]) <= 64
    assert base64.b64decode(b"".join(lines)) == request_csr.public_bytes(Encoding.DER)
    assert keys.public_keys_match(issued[0].public_key(), key.public_key())
    assert issued[1:] == [ca.issuing]


def test_enroll_puts_the_certificate_for_the_csr_key_first_then_its_chain(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    key, request_csr = new_csr()
    leaf = ca.issue(key.public_key())
    server.on(f"{PREFIX}/simpleenroll", pkcs7_response([ca.root, ca.issuing, leaf]))
    with client(transport, clock, ca) as est:
        assert est.simpleenroll(request_csr) == [leaf, ca.issuing, ca.root]


def test_enroll_rejects_a_response_without_a_certificate_for_the_csr_key(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    other = ca.issue(keys.generate_key("ec-p256").public_key())
    server.on(f"{PREFIX}/simpleenroll", pkcs7_response([other, ca.issuing]))
    with client(transport, clock, ca) as est, pytest.raises(EstProtocolError, match="CSR's key"):
        est.simpleenroll(new_csr()[1])


# -- 202 pending (RFC 7030 4.2.3) ------------------------------------------------


def test_enroll_repeats_after_202_retry_after_then_returns_certificate(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    server.on(
        f"{PREFIX}/simpleenroll",
        httpx.Response(202, headers={"Retry-After": "3"}),
        httpx.Response(202, headers={"Retry-After": "20"}),
        issue_from_request(ca),
    )
    key, request_csr = new_csr()
    with client(transport, clock, ca, total_timeout=60) as est:
        issued = est.simpleenroll(request_csr)
    assert keys.public_keys_match(issued[0].public_key(), key.public_key())
    assert clock.sleeps == [3.0, 20.0]
    assert len(server.requests) == 3
    assert server.requests[0].content == server.requests[2].content


def test_enroll_accepts_retry_after_as_http_date(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    server.on(
        f"{PREFIX}/simpleenroll",
        httpx.Response(202, headers={"Retry-After": when}),
        issue_from_request(ca),
    )
    with client(transport, clock, ca) as est:
        est.simpleenroll(new_csr()[1])
    (delay,) = clock.sleeps
    assert 27 <= delay <= 30


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [("600", 600.0), ("120", 120.0)],
    ids=["fail/retry-after-beyond-deadline", "fail/retry-after-at-deadline"],
)
def test_enroll_raises_pending_when_retry_after_would_pass_the_deadline(
    server: Server,
    transport: httpx.MockTransport,
    clock: FakeClock,
    ca: Pki,
    retry_after: str,
    expected: float,
) -> None:
    server.on(f"{PREFIX}/simpleenroll", httpx.Response(202, headers={"Retry-After": retry_after}))
    with (
        client(transport, clock, ca, total_timeout=120) as est,
        pytest.raises(EnrollmentPending) as caught,
    ):
        est.simpleenroll(new_csr()[1])
    assert caught.value.retry_after == expected
    assert "enrollment pending" in str(caught.value)
    assert clock.sleeps == []


def test_enroll_polls_until_the_deadline_then_raises_pending(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    server.on(f"{PREFIX}/simpleenroll", httpx.Response(202, headers={"Retry-After": "10"}))
    with client(transport, clock, ca, total_timeout=35) as est, pytest.raises(EnrollmentPending):
        est.simpleenroll(new_csr()[1])
    assert clock.sleeps == [10.0, 10.0, 10.0]
    assert len(server.requests) == 4


def test_enroll_does_not_busy_loop_on_retry_after_zero(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    server.on(
        f"{PREFIX}/simpleenroll",
        httpx.Response(202, headers={"Retry-After": "0"}),
        issue_from_request(ca),
    )
    with client(transport, clock, ca) as est:
        est.simpleenroll(new_csr()[1])
    assert clock.sleeps == [est_module.MIN_PENDING_DELAY]


# -- retries ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_transient_status_is_retried_with_full_jitter_backoff(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki, status: int
) -> None:
    server.on(
        f"{PREFIX}/cacerts",
        text_response(status, "busy"),
        text_response(status, "busy"),
        text_response(status, "busy"),
        pkcs7_response([ca.root]),
    )
    with client(transport, clock, ca, retries=3, backoff=2.0, max_backoff=5.0) as est:
        assert est.cacerts() == [ca.root]
    assert len(clock.sleeps) == 3
    for attempt, delay in enumerate(clock.sleeps):
        assert 0 <= delay <= min(5.0, 2.0 * 2**attempt)
    assert len(set(clock.sleeps)) == 3  # jittered, not a fixed schedule


def test_backoff_delays_are_full_jitter_within_exponential_caps() -> None:
    from estkit.client.retry import backoff_delay

    rng = random.Random(1)
    for attempt, cap in [(0, 1.0), (1, 2.0), (2, 4.0), (5, 30.0), (60, 30.0)]:
        delays = [backoff_delay(attempt, base=1.0, cap=30.0, rng=rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8 and min(delays) < cap * 0.2


@pytest.mark.parametrize("status", [429, 503])
def test_transient_status_honours_retry_after(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki, status: int
) -> None:
    server.on(
        f"{PREFIX}/cacerts",
        text_response(status, "slow down", **{"Retry-After": "7"}),
        pkcs7_response([ca.root]),
    )
    with client(transport, clock, ca) as est:
        est.cacerts()
    assert clock.sleeps == [7.0]


def test_transient_status_gives_up_after_the_retries_with_the_last_reason(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    server.on(f"{PREFIX}/cacerts", text_response(503, "database unavailable"))
    with client(transport, clock, ca, retries=2) as est, pytest.raises(EstHttpError) as caught:
        est.cacerts()
    assert caught.value.status == 503
    assert "database unavailable" in str(caught.value)
    assert len(server.requests) == 3
    assert len(clock.sleeps) == 2


def test_retry_after_beyond_the_deadline_is_not_waited_for(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    server.on(f"{PREFIX}/cacerts", text_response(503, "maintenance", **{"Retry-After": "3600"}))
    with client(transport, clock, ca) as est, pytest.raises(EstHttpError) as caught:
        est.cacerts()
    assert caught.value.retry_after == 3600.0
    assert clock.sleeps == []
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        (400, EstHttpError, "CSR signature does not verify"),
        (401, EstAuthError, "credentials required"),
        (403, EstAuthError, "device dev-1 is revoked"),
        (404, EstNotFoundError, "unknown label"),
        (409, EstHttpError, "conflict"),
        (500, EstHttpError, "internal error"),
    ],
    ids=["fail/400", "fail/401", "fail/403", "fail/404", "fail/409", "fail/500"],
)
def test_error_status_is_not_retried_and_carries_the_server_reason(
    server: Server,
    transport: httpx.MockTransport,
    clock: FakeClock,
    ca: Pki,
    status: int,
    error: type[EstHttpError],
    reason: str,
) -> None:
    server.on(
        f"{PREFIX}/simpleenroll",
        text_response(status, reason + "\n", **{"WWW-Authenticate": 'Basic realm="estkit"'}),
    )
    with client(transport, clock, ca) as est, pytest.raises(error) as caught:
        est.simpleenroll(new_csr()[1])
    assert type(caught.value) is error
    assert caught.value.status == status
    assert caught.value.reason == reason
    hint = " (the server asks for HTTP Basic: a user name and password)" if status == 401 else ""
    assert str(caught.value).endswith(f": {reason}{hint}")
    assert f"POST {BASE_URL}/simpleenroll: HTTP {status}" in str(caught.value)
    assert len(server.requests) == 1
    assert clock.sleeps == []


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ("revoked", "revoked"),
        (" Not-Yet-Valid ", "not-yet-valid"),
        (None, None),
        ("", None),
        ("revoked; really", None),
        ("x" * 65, None),
    ],
    ids=[
        "ok/code",
        "ok/code-case-and-space",
        "ok/no-header",
        "fail/empty",
        "fail/not-a-token",
        "fail/too-long",
    ],
)
def test_error_carries_the_refusal_code_from_its_header(
    server: Server,
    transport: httpx.MockTransport,
    clock: FakeClock,
    ca: Pki,
    header: str | None,
    code: str | None,
) -> None:
    headers = {} if header is None else {"Estkit-Refusal-Code": header}
    server.on(f"{PREFIX}/simplereenroll", text_response(403, "no renewal for you", **headers))
    with client(transport, clock, ca) as est, pytest.raises(EstAuthError) as caught:
        est.simplereenroll(new_csr()[1])
    assert caught.value.code == code
    assert caught.value.reason == "no renewal for you"  # the reason is still shown
    assert str(caught.value).endswith("HTTP 403 Forbidden: no renewal for you")


def test_rate_limit_is_retried_after_its_retry_after_and_keeps_its_code(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    limited = text_response(
        429, "too many attempts", **{"Estkit-Refusal-Code": "rate-limited", "Retry-After": "30"}
    )
    server.on(f"{PREFIX}/simpleenroll", limited)
    with (
        client(transport, clock, ca, retries=1) as est,
        pytest.raises(EstHttpError) as caught,
    ):
        est.simpleenroll(new_csr()[1])
    assert (caught.value.status, caught.value.code, caught.value.retry_after) == (
        429,
        "rate-limited",
        30.0,
    )
    assert clock.sleeps == [30.0]


def test_a_server_that_keeps_failing_opens_the_shared_breaker(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    from estkit.client import CircuitBreaker, EstCircuitOpen

    breaker = CircuitBreaker(threshold=3, window=60, cooldown=30, clock=clock)
    server.on(f"{PREFIX}/cacerts", text_response(503, "busy"))
    options: dict[str, Any] = {"retries": 1, "backoff": 0, "breaker": breaker}
    with client(transport, clock, ca, **options) as est, pytest.raises(EstHttpError):
        est.cacerts()
    with (
        client(transport, clock, ca, **options) as est,
        pytest.raises(EstCircuitOpen) as caught,
    ):
        est.cacerts()
    assert len(server.requests) == 3
    assert isinstance(caught.value, EstConnectionError)
    assert caught.value.retry_after == 30.0
    assert "will try again in 30 s" in str(caught.value)


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b"line one\nline two\r\n", "text/plain; charset=utf-8", "line one line two"),
        (b"x" * 500, "text/plain", "x" * 199 + "\u2026"),
        (b"bad \x1b[31mterminal\x07", "text/plain", "bad [31mterminal"),
        (b"<html><body>Forbidden</body></html>", "text/html", ""),
    ],
    ids=["ok/multi-line-joined", "ok/truncated", "ok/control-chars-dropped", "ok/html-ignored"],
)
def test_error_reason_is_one_short_printable_line(
    server: Server,
    transport: httpx.MockTransport,
    clock: FakeClock,
    ca: Pki,
    body: bytes,
    content_type: str,
    reason: str,
) -> None:
    server.on(
        f"{PREFIX}/cacerts",
        httpx.Response(403, content=body, headers={"Content-Type": content_type}),
    )
    with client(transport, clock, ca) as est, pytest.raises(EstAuthError) as caught:
        est.cacerts()
    assert caught.value.reason == reason
    assert "\n" not in str(caught.value)
    assert "HTTP 403 Forbidden" in str(caught.value)


def _raise(exc: Exception) -> Any:
    def answer(request: httpx.Request) -> httpx.Response:
        raise exc

    return answer


def _tls_connect_error() -> httpx.ConnectError:
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_message = "unable to get local issuer certificate"
    try:
        raise httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED]") from cause
    except httpx.ConnectError as exc:
        return exc


def test_connection_errors_are_retried_then_reported_with_the_url(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    server.on(
        f"{PREFIX}/cacerts",
        _raise(httpx.ConnectError("connection refused")),
        _raise(httpx.ReadTimeout("timed out")),
        pkcs7_response([ca.root]),
    )
    with client(transport, clock, ca) as est:
        assert est.cacerts() == [ca.root]
    assert len(clock.sleeps) == 2

    server.on(f"{PREFIX}/cacerts", _raise(httpx.ConnectError("connection refused")))
    with (
        client(transport, clock, ca, retries=1) as est,
        pytest.raises(EstConnectionError) as caught,
    ):
        est.cacerts()
    assert caught.value.url == f"{BASE_URL}/cacerts"
    assert "connection refused (after 2 attempts)" in str(caught.value)
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


def test_tls_verification_failure_is_not_retried(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    server.on(f"{PREFIX}/cacerts", _raise(_tls_connect_error()))
    with client(transport, clock, ca) as est, pytest.raises(EstConnectionError) as caught:
        est.cacerts()
    assert "not trusted: unable to get local issuer certificate" in str(caught.value)
    assert len(server.requests) == 1
    assert clock.sleeps == []


def test_each_attempt_gets_the_smaller_of_timeout_and_time_left(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    server.on(
        f"{PREFIX}/cacerts",
        text_response(503, "busy", **{"Retry-After": "15"}),
        pkcs7_response([ca.root]),
    )
    with client(transport, clock, ca, timeout=10, total_timeout=20) as est:
        est.cacerts()
    first, second = (r.extensions["timeout"]["read"] for r in server.requests)
    assert (first, second) == (10, 5)


# -- csrattrs and health ---------------------------------------------------------


def test_csrattrs_decodes_the_attribute_list(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    oids = [
        x509.ObjectIdentifier("1.2.840.113549.1.9.7"),
        x509.ObjectIdentifier("1.2.840.10045.4.3.2"),
    ]
    body = wire.encode_base64_body(csrattrs.encode_csrattrs(oids), line_length=64)
    server.on(
        f"{PREFIX}/csrattrs",
        httpx.Response(200, content=body, headers={"Content-Type": "application/csrattrs"}),
    )
    with client(transport, clock, ca) as est:
        assert [a.oid for a in est.csrattrs()] == oids


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(204),
        text_response(404, "no csr attributes"),
        httpx.Response(200, content=b"", headers={"Content-Type": "application/csrattrs"}),
    ],
    ids=["ok/204", "ok/404-rfc7030-4.5.2", "ok/empty-200"],
)
def test_csrattrs_is_empty_when_the_server_has_none(
    server: Server,
    transport: httpx.MockTransport,
    clock: FakeClock,
    ca: Pki,
    response: httpx.Response,
) -> None:
    server.on(f"{PREFIX}/csrattrs", response)
    with client(transport, clock, ca) as est:
        assert est.csrattrs() == []


def test_csrattrs_rejects_the_wrong_media_type(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    server.on(
        f"{PREFIX}/csrattrs",
        httpx.Response(200, content=b"MAA=", headers={"Content-Type": "application/pkcs7-mime"}),
    )
    with (
        client(transport, clock, ca) as est,
        pytest.raises(EstProtocolError, match="application/csrattrs"),
    ):
        est.csrattrs()


def test_health_is_fetched_from_the_server_root(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    device = ca.issue(keys.generate_key("ec-p256").public_key())
    server.on("/health/certificate", httpx.Response(200, content=certs.certs_to_pem([device])))
    with client(transport, clock, ca) as est:
        assert est.health() == device
    assert str(server.requests[0].url) == "https://est.example:7443/health/certificate"


# -- authentication --------------------------------------------------------------


def test_basic_credentials_are_sent_with_the_first_request(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    server.on(f"{PREFIX}/simpleenroll", issue_from_request(ca))
    with client(transport, clock, ca, auth=BasicAuth("dev-1", "s3cret")) as est:
        est.simpleenroll(new_csr()[1])
    (request,) = server.requests
    expected = base64.b64encode(b"dev-1:s3cret").decode()
    assert request.headers["authorization"] == f"Basic {expected}"
    assert request.headers["user-agent"].startswith("estkit/")


def test_basic_password_is_not_in_repr() -> None:
    assert "s3cret" not in repr(BasicAuth("dev-1", "s3cret"))


def test_unusable_client_certificate_is_a_credential_error(
    tmp_path: Any, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    key = keys.generate_key("ec-p256")
    cert = ca.issue(key.public_key())
    (tmp_path / "cert.pem").write_bytes(certs.certs_to_pem([cert, ca.issuing]))
    (tmp_path / "key.pem").write_bytes(keys.key_to_pem(keys.generate_key("ec-p256")))
    auth = ClientCertificate(tmp_path / "cert.pem", tmp_path / "key.pem")
    with (
        client(transport, clock, ca, auth=auth) as est,
        pytest.raises(CredentialError, match=r"cert\.pem"),
    ):
        est.cacerts()

    auth = ClientCertificate(tmp_path / "missing.pem", tmp_path / "key.pem")
    with client(transport, clock, ca, auth=auth) as est, pytest.raises(CredentialError):
        est.cacerts()

    (tmp_path / "enc.pem").write_bytes(
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"passphrase"))
    )
    auth = ClientCertificate(tmp_path / "cert.pem", tmp_path / "enc.pem")
    with (
        client(transport, clock, ca, auth=auth) as est,
        pytest.raises(CredentialError, match=r"enc\.pem is encrypted"),
    ):
        est.cacerts()


def test_matching_client_certificate_with_chain_loads(
    tmp_path: Any, server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    key = keys.generate_key("ec-p256")
    (tmp_path / "cert.pem").write_bytes(
        certs.certs_to_pem([ca.issue(key.public_key()), ca.issuing])
    )
    (tmp_path / "key.pem").write_bytes(keys.key_to_pem(key))
    server.on(f"{PREFIX}/cacerts", pkcs7_response([ca.root]))
    auth = ClientCertificate(tmp_path / "cert.pem", tmp_path / "key.pem")
    with client(transport, clock, ca, auth=auth) as est:
        assert est.cacerts() == [ca.root]


@pytest.mark.parametrize(
    "url",
    [
        "http://est.example/.well-known/est",
        "https://user:pw@est.example/.well-known/est",
        "https://est.example/.well-known/est?x=1",
        "est.example/.well-known/est",
    ],
    ids=["fail/http", "fail/userinfo", "fail/query", "fail/no-scheme"],
)
def test_base_url_must_be_plain_https(url: str, ca: Pki) -> None:
    with pytest.raises(ValueError, match="EST base URL"):
        EstClient(url, trust=TrustAnchor.from_certificates([ca.root]))


def test_base_url_trailing_slash_is_ignored(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    server.on(f"{PREFIX}/cacerts", pkcs7_response([ca.root]))
    est = EstClient(
        BASE_URL + "/", trust=TrustAnchor.from_certificates([ca.root]), transport=transport
    )
    with est:
        est.cacerts()
    assert str(server.requests[0].url) == f"{BASE_URL}/cacerts"


# -- trust-anchor bootstrap (RFC 7030 4.1.1) -------------------------------------


class _ContextSpy:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, server: Server) -> None:
        self.events: list[str] = []
        self.anchors: list[tuple[x509.Certificate, ...]] = []
        real_bootstrap = est_module.tls.bootstrap_context
        real_verified = est_module.tls.verified_context

        def bootstrap() -> ssl.SSLContext:
            self.events.append("unverified-tls")
            return real_bootstrap()

        def verified(anchors: Any, client_cert: Any = None, **options: Any) -> ssl.SSLContext:
            self.events.append("verified-tls")
            self.anchors.append(tuple(anchors))
            return real_verified(anchors, client_cert, **options)

        monkeypatch.setattr(est_module.tls, "bootstrap_context", bootstrap)
        monkeypatch.setattr(est_module.tls, "verified_context", verified)
        original = server.__class__.__call__

        def record(request: httpx.Request) -> httpx.Response:
            self.events.append(f"{request.method} {request.url.path.rsplit('/', 1)[-1]}")
            return original(server, request)

        self.handler = record


@pytest.mark.parametrize(
    "pick",
    [lambda ca: ca.root, lambda ca: ca.issuing],
    ids=["ok/root-fingerprint", "ok/intermediate-fingerprint"],
)
def test_fingerprint_bootstrap_trusts_only_the_matching_certificate(
    monkeypatch: pytest.MonkeyPatch, server: Server, clock: FakeClock, ca: Pki, pick: Any
) -> None:
    spy = _ContextSpy(monkeypatch, server)
    server.on(f"{PREFIX}/cacerts", pkcs7_response([ca.issuing, ca.root]))
    server.on(f"{PREFIX}/simpleenroll", issue_from_request(ca, extra=(ca.issuing,)))
    fingerprint = certs.fingerprint(pick(ca)).replace(":", "").lower()
    with client(
        httpx.MockTransport(spy.handler),
        clock,
        ca,
        trust=TrustAnchor.from_fingerprint(fingerprint),
        auth=BasicAuth("dev-1", "s3cret"),
    ) as est:
        est.simpleenroll(new_csr()[1])
        assert est.trust_anchors() == (pick(ca),)
    assert spy.events == ["unverified-tls", "GET cacerts", "verified-tls", "POST simpleenroll"]
    assert spy.anchors == [(pick(ca),)]
    bootstrap_request, enroll_request = server.requests
    assert "authorization" not in bootstrap_request.headers
    assert "authorization" in enroll_request.headers


def test_fingerprint_mismatch_fails_before_any_further_request(
    monkeypatch: pytest.MonkeyPatch, server: Server, clock: FakeClock, ca: Pki, other_ca: Pki
) -> None:
    spy = _ContextSpy(monkeypatch, server)
    server.on(f"{PREFIX}/cacerts", pkcs7_response([ca.issuing, ca.root]))
    fingerprint = certs.fingerprint(other_ca.root)
    with (
        client(
            httpx.MockTransport(spy.handler),
            clock,
            ca,
            trust=TrustAnchor.from_fingerprint(fingerprint),
        ) as est,
        pytest.raises(TrustAnchorError, match=f"none of the 2 certificates .* {fingerprint}"),
    ):
        est.simpleenroll(new_csr()[1])
    assert spy.events == ["unverified-tls", "GET cacerts"]


def test_fingerprint_mode_cacerts_refetches_over_verified_tls(
    monkeypatch: pytest.MonkeyPatch, server: Server, clock: FakeClock, ca: Pki
) -> None:
    spy = _ContextSpy(monkeypatch, server)
    server.on(f"{PREFIX}/cacerts", pkcs7_response([ca.issuing, ca.root]))
    trust = TrustAnchor.from_fingerprint(certs.fingerprint(ca.root))
    with client(httpx.MockTransport(spy.handler), clock, ca, trust=trust) as est:
        assert est.cacerts() == [ca.issuing, ca.root]
    assert spy.events == ["unverified-tls", "GET cacerts", "verified-tls", "GET cacerts"]


@pytest.mark.parametrize(
    "text",
    ["abc", "ZZ" * 32, "AB:" * 31 + "A"],
    ids=["fail/short", "fail/not-hex", "fail/odd"],
)
def test_bad_fingerprint_is_a_trust_anchor_error(text: str) -> None:
    with pytest.raises(TrustAnchorError, match="64 hex digits"):
        TrustAnchor.from_fingerprint(text)


def test_trust_anchor_file_errors_name_the_file(tmp_path: Any) -> None:
    with pytest.raises(TrustAnchorError, match=r"missing\.pem"):
        TrustAnchor.from_file(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(TrustAnchorError, match=r"junk\.pem"):
        TrustAnchor.from_file(tmp_path / "junk.pem")


def test_cacerts_orders_each_certificate_before_its_issuer(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki, other_ca: Pki
) -> None:
    body = certs_body([ca.root, other_ca.root, ca.issuing], line_length=64)
    server.on(
        f"{PREFIX}/cacerts",
        httpx.Response(200, content=body, headers={"Content-Type": wire.PKCS7_MIME}),
    )
    with client(transport, clock, ca) as est:
        got = est.cacerts()
    assert sorted(map(certs.fingerprint, got)) == sorted(
        map(certs.fingerprint, [ca.root, other_ca.root, ca.issuing])
    )
    assert got.index(ca.root) == got.index(ca.issuing) + 1


def test_an_old_ca_certificate_issued_just_before_a_rollover_verifies_with_the_known_chain(
    server: Server, transport: httpx.MockTransport, clock: FakeClock, ca: Pki
) -> None:
    # /cacerts switched to the new CA between the enrollment and the request for it: the
    # certificate is the old CA's, whose certificate the device holds in its chain.
    new_key = keys.generate_key("ec-p256")
    new_ca = profiles.issue_ca(
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Root Issuing G2")]),
        public_key=new_key.public_key(),
        issuer=ca.root,
        issuer_key=ca.root_key,
        validity=dt.timedelta(days=30),
        now=NOW - dt.timedelta(days=1),
        path_length=0,
    )
    key, _ = new_csr()
    leaf = ca.issue(key.public_key())
    server.on(
        f"{PREFIX}/cacerts",
        pkcs7_response([new_ca, ca.root], content_type=wire.CACERTS_CONTENT_TYPE),
    )
    with client(transport, clock, ca) as est:
        with pytest.raises(IssuedCertificateError, match="does not chain"):
            est.verify_issued([leaf], public_key=key.public_key(), now=NOW)
        issued = est.verify_issued(
            [leaf], public_key=key.public_key(), now=NOW, known=(ca.issuing,)
        )
    assert issued.chain == (ca.issuing,)
    # The server's answer comes first: a known chain never hides the new CA's.
    new_leaf = profiles.issue_leaf(
        profile=profiles.Profile("device", profiles.Kind.OPERATIONAL, dt.timedelta(days=1)),
        public_key=key.public_key(),
        subject=leaf.subject,
        sans=None,
        issuer=new_ca,
        issuer_key=new_key,
        now=NOW,
    )
    with client(transport, clock, ca) as est:
        issued = est.verify_issued(
            [new_leaf], public_key=key.public_key(), now=NOW, known=(ca.issuing,)
        )
    assert issued.chain == (new_ca,)
