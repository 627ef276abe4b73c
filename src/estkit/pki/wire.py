"""EST body encodings (RFC 7030 section 4, RFC 8951 clarifications).

Bodies are base64 of DER. Decoders ignore all whitespace and the
Content-Transfer-Encoding header value (RFC 8951 section 3.2); encoders emit
one line with no whitespace by default, or lines of a chosen length.
"""

from __future__ import annotations

import base64
import binascii

from estkit.pki.errors import DecodeError

PKCS7_MIME = "application/pkcs7-mime"
PKCS10 = "application/pkcs10"
CSRATTRS = "application/csrattrs"
PKCS8 = "application/pkcs8"

# RFC 7030 4.1.3 / 4.2.3 media types with their smime-type parameters.
CACERTS_CONTENT_TYPE = "application/pkcs7-mime"
ENROLL_CONTENT_TYPE = "application/pkcs7-mime; smime-type=certs-only"

_WHITESPACE = b" \t\r\n\v\f"


def decode_base64_body(body: bytes) -> bytes:
    """Return the DER inside an EST base64 body, with or without line breaks."""
    compact = body.translate(None, _WHITESPACE)
    if not compact:
        raise DecodeError("empty body, expected base64")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError("body is not valid base64") from exc


def encode_base64_body(der: bytes, *, line_length: int = 0, newline: bytes = b"\n") -> bytes:
    """Base64-encode DER; ``line_length`` 0 means one line with no newline at all."""
    if line_length < 0 or line_length % 4:
        raise ValueError(f"line_length must be 0 or a positive multiple of 4, got {line_length}")
    text = base64.b64encode(der)
    if not line_length:
        return text
    lines = [text[i : i + line_length] for i in range(0, len(text), line_length)]
    return newline.join(lines) + newline


def media_type(content_type: str | None) -> str:
    """The bare, lower-cased media type of a Content-Type value, parameters dropped."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()
