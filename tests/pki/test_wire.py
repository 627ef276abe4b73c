"""EST body encodings: RFC 7030 base64 bodies as RFC 8951 clarifies them, and media types."""

from __future__ import annotations

import base64

import pytest

from estkit.pki.errors import DecodeError
from estkit.pki.wire import (
    CSRATTRS,
    ENROLL_CONTENT_TYPE,
    PKCS7_MIME,
    PKCS10,
    decode_base64_body,
    encode_base64_body,
    media_type,
)

DER = bytes(range(256)) * 2  # 512 bytes: 684 base64 characters, many lines when wrapped
B64 = base64.b64encode(DER)


def wrap(text: bytes, width: int, newline: bytes) -> bytes:
    return newline.join(text[i : i + width] for i in range(0, len(text), width)) + newline


@pytest.mark.parametrize(
    "body",
    [
        B64,
        wrap(B64, 64, b"\n"),
        wrap(B64, 76, b"\n"),
        wrap(B64, 64, b"\r\n"),
        wrap(B64, 76, b"\r\n"),
        wrap(B64, 64, b"\n").rstrip(b"\n"),
        B64 + b" \t\r\n",
        b"\r\n" + B64,
        b" ".join(B64[i : i + 4] for i in range(0, len(B64), 4)),
        wrap(B64, 64, b" \n\t"),
    ],
    ids=[
        "ok/one-line-no-newline",
        "ok/64-columns-lf",
        "ok/76-columns-lf",
        "ok/64-columns-crlf",
        "ok/76-columns-crlf",
        "ok/wrapped-without-final-newline",
        "ok/trailing-whitespace",
        "ok/leading-newline",
        "ok/spaces-between-groups",
        "ok/trailing-space-on-each-line",
    ],
)
def test_decode_base64_body_ignores_line_breaks_and_whitespace(body):
    assert decode_base64_body(body) == DER


@pytest.mark.parametrize(
    "body",
    [b"", b" \r\n\t", b"not base64!", b"AAA", b"A", b"AA=A", b"AA==AA==", b"\xff\xfe\xfd\xfc"],
    ids=[
        "fail/empty",
        "fail/only-whitespace",
        "fail/not-base64-alphabet",
        "fail/missing-padding",
        "fail/single-character",
        "fail/padding-in-the-middle",
        "fail/data-after-padding",
        "fail/non-ascii",
    ],
)
def test_decode_base64_body_rejects_what_is_not_base64(body):
    with pytest.raises(DecodeError):
        decode_base64_body(body)


def test_decode_error_is_a_value_error():
    with pytest.raises(ValueError):
        decode_base64_body(b"")


def test_encode_base64_body_defaults_to_one_line_without_newline():
    body = encode_base64_body(DER)
    assert body == B64
    assert not any(c in body for c in b" \t\r\n")


@pytest.mark.parametrize(
    ("line_length", "newline"),
    [(64, b"\n"), (76, b"\n"), (64, b"\r\n"), (76, b"\r\n"), (4, b"\n")],
    ids=["ok/64-lf", "ok/76-lf", "ok/64-crlf", "ok/76-crlf", "ok/4-lf"],
)
def test_encode_base64_body_wraps_at_line_length_with_final_newline(line_length, newline):
    body = encode_base64_body(DER, line_length=line_length, newline=newline)
    assert body.endswith(newline)
    lines = body[: -len(newline)].split(newline)
    assert all(len(line) == line_length for line in lines[:-1])
    assert 0 < len(lines[-1]) <= line_length
    assert b"".join(lines) == B64
    assert decode_base64_body(body) == DER


def test_encode_base64_body_adds_no_blank_line_when_text_fills_the_last_line():
    body = encode_base64_body(bytes(96), line_length=64)  # exactly two lines of 64
    assert body.split(b"\n") == [b"A" * 64, b"A" * 64, b""]


@pytest.mark.parametrize(
    "line_length", [-4, -1, 1, 3, 63, 65, 75], ids=lambda n: f"fail/line-length-{n}"
)
def test_encode_base64_body_rejects_line_length_not_a_multiple_of_4(line_length):
    with pytest.raises(ValueError, match="line_length"):
        encode_base64_body(DER, line_length=line_length)


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/pkcs7-mime", PKCS7_MIME),
        (ENROLL_CONTENT_TYPE, PKCS7_MIME),
        ("application/pkcs7-mime;smime-type=certs-only", PKCS7_MIME),
        ('application/pkcs7-mime; smime-type="certs-only"; name=cert.p7c', PKCS7_MIME),
        ("Application/PKCS7-MIME ; smime-type=CERTS-ONLY", PKCS7_MIME),
        ("application/pkcs10", PKCS10),
        ("  APPLICATION/CSRATTRS  ", CSRATTRS),
        ("", ""),
        (None, ""),
    ],
    ids=[
        "ok/bare",
        "ok/enroll-content-type",
        "ok/parameter-without-space",
        "ok/several-parameters",
        "ok/upper-case-and-space-before-semicolon",
        "ok/pkcs10",
        "ok/surrounding-space",
        "ok/empty",
        "ok/absent",
    ],
)
def test_media_type_is_bare_lower_case_type_without_parameters(content_type, expected):
    assert media_type(content_type) == expected
