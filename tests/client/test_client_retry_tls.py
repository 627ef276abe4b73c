"""Retry-After parsing, transient-error classification, and the TLS contexts."""

from __future__ import annotations

import contextlib
import datetime as dt
import ssl
from pathlib import Path

import httpx
import pytest
from client_fakes import NOW as NOW_REAL
from client_fakes import Pki
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from estkit.client import ClientCertificate, tls
from estkit.client.retry import is_transient_error, parse_retry_after
from estkit.pki import certs, keys, profiles

NOW = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("0", 0.0),
        ("Sat, 01 Mar 2025 12:01:30 GMT", 90.0),
        ("Sat, 01 Mar 2025 11:00:00 GMT", 0.0),
        ("Sat, 01 Mar 2025 12:00:10 -0000", 10.0),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("", None),
        (None, None),
    ],
    ids=[
        "ok/seconds",
        "ok/seconds-padded",
        "ok/zero",
        "ok/http-date",
        "ok/http-date-past",
        "ok/http-date-no-zone",
        "fail/word",
        "fail/negative",
        "fail/fraction",
        "fail/empty",
        "fail/absent",
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


def _with_cause(exc: httpx.TransportError, cause: BaseException) -> httpx.TransportError:
    try:
        raise exc from cause
    except httpx.TransportError as raised:
        return raised


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (httpx.ConnectError("refused"), True),
        (httpx.ConnectTimeout("slow"), True),
        (httpx.ReadTimeout("slow"), True),
        (httpx.ReadError("reset"), True),
        (httpx.RemoteProtocolError("server disconnected"), True),
        (_with_cause(httpx.ConnectError("eof"), ssl.SSLEOFError(8, "EOF")), True),
        (_with_cause(httpx.ConnectError("bad"), ssl.SSLCertVerificationError(1, "x")), False),
        (_with_cause(httpx.ReadError("alert"), ssl.SSLError(1, "tlsv13 alert")), False),
        (httpx.UnsupportedProtocol("ftp"), False),
        (httpx.LocalProtocolError("bad header"), False),
    ],
    ids=[
        "ok/connect-error",
        "ok/connect-timeout",
        "ok/read-timeout",
        "ok/read-error",
        "ok/disconnected",
        "ok/tls-eof",
        "fail/tls-verify",
        "fail/tls-alert",
        "fail/unsupported-protocol",
        "fail/local-protocol",
    ],
)
def test_only_transient_transport_errors_are_retried(
    exc: httpx.TransportError, transient: bool
) -> None:
    assert is_transient_error(exc) is transient


def test_verified_context_trusts_only_the_anchor_and_checks_hostnames(ca: Pki) -> None:
    context = tls.verified_context([ca.root])
    assert context.check_hostname is True
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN
    stored = context.get_ca_certs(binary_form=True)
    assert stored == [ca.root.public_bytes(Encoding.DER)]


def test_bootstrap_context_verifies_nothing() -> None:
    context = tls.bootstrap_context()
    assert context.verify_mode == ssl.CERT_NONE
    assert context.check_hostname is False
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.get_ca_certs() == []


# -- real handshakes in memory (no sockets) ------------------------------------------


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext, hostname: str) -> None:
    """Run a TLS handshake between two contexts over memory BIOs; raise what either raises."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, end in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3 sends the server's verdict on the client certificate afterwards.
            with contextlib.suppress(ssl.SSLWantReadError):
                c.read(1)
            return
    raise AssertionError("handshake did not finish")


def _server_context(
    tmp_path: Path, ca: Pki, *, client_ca: x509.Certificate | None = None
) -> ssl.SSLContext:
    key = keys.generate_key("ec-p256")
    cert = profiles.issue_leaf(
        profile=profiles.Profile("tls", profiles.Kind.TLS_SERVER, dt.timedelta(days=30)),
        public_key=key.public_key(),
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "est.example")]),
        sans=x509.SubjectAlternativeName([x509.DNSName("est.example")]),
        issuer=ca.issuing,
        issuer_key=ca.issuing_key,
        now=NOW_REAL,
    )
    (tmp_path / "server.pem").write_bytes(certs.certs_to_pem([cert, ca.issuing]))
    (tmp_path / "server.key").write_bytes(keys.key_to_pem(key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=certs.certs_to_pem([client_ca]).decode())
    return context


@pytest.mark.parametrize(
    ("anchor", "hostname", "error"),
    [
        ("root", "est.example", None),
        ("issuing", "est.example", None),
        ("root", "other.example", "Hostname mismatch"),
        ("other", "est.example", "unable to get local issuer certificate"),
    ],
    ids=["ok/root-anchor", "ok/intermediate-anchor", "fail/hostname", "fail/other-ca"],
)
def test_verified_context_in_a_real_handshake(
    tmp_path: Path, ca: Pki, other_ca: Pki, anchor: str, hostname: str, error: str | None
) -> None:
    anchors = {"root": ca.root, "issuing": ca.issuing, "other": other_ca.root}
    client = tls.verified_context([anchors[anchor]])
    server = _server_context(tmp_path, ca)
    if error is None:
        _handshake(client, server, hostname)
    else:
        with pytest.raises(ssl.SSLCertVerificationError) as caught:
            _handshake(client, server, hostname)
        assert error in caught.value.verify_message


def test_client_certificate_chain_is_sent_in_full(tmp_path: Path, ca: Pki) -> None:
    # The server trusts only the root, so it needs the intermediate from the client's file.
    key = keys.generate_key("ec-p256")
    (tmp_path / "dev.pem").write_bytes(
        certs.certs_to_pem([ca.issue(key.public_key(), now=NOW_REAL), ca.issuing])
    )
    (tmp_path / "dev.key").write_bytes(keys.key_to_pem(key))
    client = tls.verified_context(
        [ca.root], ClientCertificate(tmp_path / "dev.pem", tmp_path / "dev.key")
    )
    _handshake(client, _server_context(tmp_path, ca, client_ca=ca.root), "est.example")


def test_bootstrap_context_accepts_any_server(tmp_path: Path, other_ca: Pki) -> None:
    _handshake(tls.bootstrap_context(), _server_context(tmp_path, other_ca), "whatever.example")
