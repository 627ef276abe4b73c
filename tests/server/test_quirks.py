"""Per-client wire choices (server/quirks.py) and the 401 reason header (server/errors.py)."""

from __future__ import annotations

import pytest

from estkit.server.errors import header_reason
from estkit.server.quirks import (
    ONE_LINE,
    WRAPPED_LINE_LENGTH,
    base64_line_length,
    canonical_head,
    canonical_name,
    looks_like_strongswan_pki,
)

# Request headers as ASGI has them (lower-case names), in the order each client sends them.
PKI_GET = [(b"host", b"est.example:7443")]
PKI_BASIC_POST = [
    (b"host", b"est.example:7443"),
    (b"authorization", b"Basic ZGV2OnNlY3JldA=="),
    (b"content-type", b"application/pkcs10"),
    (b"content-length", b"268"),
]
PKI_CERT_POST = [PKI_BASIC_POST[0], *PKI_BASIC_POST[2:]]
LIBEST = [
    (b"user-agent", b"libest client 1.0"),
    (b"connection", b"close"),
    (b"host", b"est.example:7443"),
    (b"accept", b"*/*"),
]
BOUNCY_CASTLE = [(b"connection", b"close"), (b"host", b"est.example:7443")]
CURL = [(b"host", b"est.example"), (b"user-agent", b"curl/7.88.1"), (b"accept", b"*/*")]
GO = [(b"host", b"est.example"), (b"user-agent", b"Go-http-client/1.1")]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (PKI_GET, True),
        (PKI_BASIC_POST, True),
        (PKI_CERT_POST, True),
        (LIBEST, False),
        (BOUNCY_CASTLE, False),
        (CURL, False),
        (GO, False),
        ([], False),
        ([(b"authorization", b"Basic eDp5")], False),
    ],
    ids=[
        "pki/estca",
        "pki/est-userpass",
        "pki/est-cert",
        "other/libest",
        "other/bouncy-castle",
        "other/curl",
        "other/go",
        "other/no-headers",
        "other/no-host",
    ],
)
def test_strongswan_pki_is_recognised_by_the_headers_it_sends(headers, expected):
    assert looks_like_strongswan_pki(headers) is expected


@pytest.mark.parametrize(
    ("setting", "headers", "expected"),
    [
        (None, PKI_GET, ONE_LINE),
        (None, LIBEST, WRAPPED_LINE_LENGTH),
        (None, CURL, 64),
        (0, LIBEST, 0),
        (76, PKI_GET, 76),
        (64, CURL, 64),
    ],
    ids=[
        "auto/pki-one-line",
        "auto/libest-wrapped",
        "auto/curl-wrapped",
        "override/0-for-libest-too",
        "override/76-for-pki-too",
        "override/64",
    ],
)
def test_a_label_setting_overrides_the_per_client_choice(setting, headers, expected):
    assert base64_line_length(setting, headers) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (b"content-type", b"Content-Type"),
        (b"content-length", b"Content-Length"),
        (b"content-transfer-encoding", b"Content-Transfer-Encoding"),
        (b"www-authenticate", b"WWW-Authenticate"),
        (b"retry-after", b"Retry-After"),
        (b"estkit-refusal-code", b"Estkit-Refusal-Code"),
        (b"estkit-refusal-reason", b"Estkit-Refusal-Reason"),
        (b"etag", b"ETag"),
        (b"x-request-id", b"X-Request-Id"),
        (b"x-ms-request-id", b"X-Ms-Request-Id"),
        (b"Content-Type", b"Content-Type"),
    ],
    ids=lambda v: v.decode() if isinstance(v, bytes) else str(v),
)
def test_header_names_are_written_in_canonical_case(name, expected):
    assert canonical_name(name) == expected


def test_canonical_head_rewrites_names_and_keeps_values_and_framing():
    head = (
        b"HTTP/1.1 401 Unauthorized\r\ndate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
        b'www-authenticate: Basic realm="estkit"\r\ncontent-length: 0\r\n'
        b"estkit-refusal-reason: a:b: c\r\nconnection: close\r\n\r\n"
    )

    assert canonical_head(head) == (
        b"HTTP/1.1 401 Unauthorized\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
        b'WWW-Authenticate: Basic realm="estkit"\r\nContent-Length: 0\r\n'
        b"Estkit-Refusal-Reason: a:b: c\r\nConnection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("authentication required", "authentication required"),
        ("two\nlines\r\n  and\ttabs", "two lines and tabs"),
        ("CN 'dév' is not the device id", "CN 'd\\xe9v' is not the device id"),
        ("nul\x00byte", "nul?byte"),
        ("x" * 500, "x" * 200),
    ],
    ids=["ok/plain", "ok/one-line", "ok/non-ascii-escaped", "ok/control-char", "ok/bounded"],
)
def test_401_reason_header_is_one_bounded_line_of_printable_ascii(reason, expected):
    assert header_reason(reason) == expected
