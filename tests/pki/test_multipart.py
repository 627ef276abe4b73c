"""multipart/mixed reading and the serverkeygen answer (RFC 2046 5.1, RFC 7030 4.4.2)."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography.hazmat.primitives import serialization

from estkit.pki import cms, keys, multipart, profiles, serverkeygen
from estkit.pki.errors import DecodeError
from testpki import cn_name, make_ca_pair

NOW = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
_CA = make_ca_pair("Root", "Issuing", now=NOW)
KEY = keys.generate_key("ec-p256")
CERT = profiles.issue_leaf(
    profile=profiles.Profile("device", profiles.Kind.OPERATIONAL, dt.timedelta(days=30)),
    public_key=KEY.public_key(),
    subject=cn_name("dev-1"),
    sans=None,
    issuer=_CA.issuing,
    issuer_key=_CA.issuing_key,
    now=NOW,
)
KEY_B64 = base64.b64encode(serverkeygen.private_key_der(KEY))
CERTS_B64 = base64.b64encode(cms.encode_certs_only([CERT]))
# The same key as SEC1 (RFC 5915), which RFC 7030 4.4.2's application/pkcs8 is not.
SEC1_DER = KEY.private_bytes(
    serialization.Encoding.DER,
    serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption(),
)


def _wrap(text: bytes, width: int, newline: bytes) -> bytes:
    if not width:
        return text
    return newline.join(text[i : i + width] for i in range(0, len(text), width))


def _body(
    *, newline: bytes = b"\r\n", key_first: bool = True, width: int = 64, boundary: bytes = b"b1"
) -> bytes:
    key = (
        b"Content-Type: application/pkcs8" + newline
        + b"Content-Transfer-Encoding: base64" + newline + newline
        + _wrap(KEY_B64, width, newline)
    )  # fmt: skip
    certs = (
        b"Content-Type: application/pkcs7-mime;" + newline
        + b" smime-type=certs-only" + newline  # a folded header field
        + newline + _wrap(CERTS_B64, width, newline)
    )  # fmt: skip
    parts = [key, certs] if key_first else [certs, key]
    delimiter = newline + b"--" + boundary + newline
    return (
        b"preamble to ignore" + delimiter + delimiter.join(parts)
        + newline + b"--" + boundary + b"--" + newline + b"epilogue"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("newline", "key_first", "width"),
    [
        (b"\r\n", True, 64),
        (b"\n", True, 76),
        (b"\r\n", False, 0),
        (b"\n", False, 64),
    ],
    ids=[
        "ok/crlf-key-first",
        "ok/lf-wrapped-76",
        "ok/crlf-certs-first-one-line",
        "ok/lf-certs-first",
    ],
)
def test_serverkeygen_answer_decodes_in_any_part_order_and_line_ending(
    newline: bytes, key_first: bool, width: int
) -> None:
    body = _body(newline=newline, key_first=key_first, width=width)
    decoded = multipart.decode_serverkeygen(body, "multipart/mixed; boundary=b1")
    assert keys.public_keys_match(decoded.private_key.public_key(), KEY.public_key())
    assert decoded.certificates == (CERT,)


def test_serverkeygen_answer_of_the_estkit_encoder_decodes() -> None:
    body = serverkeygen.encode_response(
        (serverkeygen.KEY_PART, serverkeygen.private_key_der(KEY)), cms.encode_certs_only([CERT])
    )
    decoded = multipart.decode_serverkeygen(body, serverkeygen.CONTENT_TYPE)
    assert keys.public_keys_match(decoded.private_key.public_key(), KEY.public_key())
    assert decoded.certificates == (CERT,)


def test_quoted_boundary_and_parameters_are_read() -> None:
    body = _body(boundary=b"a b'c")
    decoded = multipart.decode_serverkeygen(body, 'Multipart/Mixed; charset=x; boundary="a b\'c"')
    assert decoded.certificates == (CERT,)


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (_body(), "application/pkcs7-mime", "expected multipart/mixed"),
        (_body(), "multipart/mixed", "without a valid boundary"),
        (_body()[:-20], "multipart/mixed; boundary=b1", "without its closing delimiter"),
        (
            _body().replace(b"application/pkcs8", b"application/pkcs7-mime"),
            "multipart/mixed; boundary=b1",
            "got 0 and 2",
        ),
        (
            _body().replace(
                b"application/pkcs8", b"application/pkcs7-mime; smime-type=server-generated-key"
            ),
            "multipart/mixed; boundary=b1",
            "encrypted",
        ),
        (
            _body().replace(b"application/pkcs8", b"text/plain"),
            "multipart/mixed; boundary=b1",
            "unexpected part",
        ),
        (
            _body().replace(KEY_B64[:8], b"AAAAAAAA"),
            "multipart/mixed; boundary=b1",
            "not (an unencrypted DER )?PKCS#8",
        ),
        (b"--b1--\r\n", "multipart/mixed; boundary=b1", "no parts"),
        (
            _body(width=0).replace(KEY_B64, base64.b64encode(SEC1_DER)),
            "multipart/mixed; boundary=b1",
            "not PKCS#8",
        ),
    ],
    ids=[
        "fail/not-multipart",
        "fail/no-boundary",
        "fail/truncated",
        "fail/no-key-part",
        "fail/encrypted-key",
        "fail/unknown-part",
        "fail/broken-key",
        "fail/empty",
        "fail/sec1-not-pkcs8",
    ],
)
def test_broken_serverkeygen_answers_are_refused(
    body: bytes, content_type: str, message: str
) -> None:
    with pytest.raises(DecodeError, match=message):
        multipart.decode_serverkeygen(body, content_type)


def test_split_keeps_part_headers_and_bodies() -> None:
    body = b"--x\nContent-Type: text/plain\n\nhello\n--x\n\nno headers\n--x--"
    parts = multipart.split_multipart(body, "multipart/mixed; boundary=x")
    assert [(dict(p.headers), p.body) for p in parts] == [
        ({"content-type": "text/plain"}, b"hello"),
        ({}, b"no headers"),
    ]
