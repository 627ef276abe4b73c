"""Reading ``multipart/mixed`` bodies (RFC 2046 5.1) and the serverkeygen answer in one
(RFC 7030 4.4.2): the private key and the certs-only CMS of its certificate.

Lenient where peers differ, strict where a mistake would hide a broken answer:
lines may end in CRLF or LF, the parts may come in either order, each part's
base64 may be wrapped or not and its Content-Transfer-Encoding value is
ignored (RFC 8951 3.2); the body must have its closing delimiter, and exactly
one key part and one certificate part. (The encoder is ``pki.serverkeygen``.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from estkit.pki import cms, keys, wire
from estkit.pki import der as der_codec
from estkit.pki.errors import DecodeError

MULTIPART_MIXED = "multipart/mixed"
ENCRYPTED_KEY_SMIME_TYPE = "server-generated-key"
# RFC 2046 5.1.1: 1 to 70 characters of a restricted set.
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
_PARAMETER = re.compile(r';\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')
_HEADERS_END = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True, slots=True)
class BodyPart:
    """One part: its header fields (names lower-cased) and its body, as sent."""

    headers: Mapping[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "text/plain")


@dataclass(frozen=True, slots=True)
class ServerGeneratedKey:
    """A serverkeygen answer: the key the server made, and the certificates sent with it
    (in the CMS's order, which means nothing)."""

    private_key: keys.PrivateKey
    certificates: tuple[x509.Certificate, ...]


def content_type_parameters(content_type: str) -> dict[str, str]:
    """The parameters of a Content-Type value, names lower-cased, quotes removed."""
    out: dict[str, str] = {}
    for name, value in _PARAMETER.findall(content_type):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        out[name.lower()] = value
    return out


def split_multipart(body: bytes, content_type: str) -> list[BodyPart]:
    """The parts of a multipart ``body`` whose Content-Type value is ``content_type``."""
    if wire.media_type(content_type).split("/")[0] != "multipart":
        raise DecodeError(f"expected a multipart body, got {content_type or 'no Content-Type'}")
    boundary = content_type_parameters(content_type).get("boundary", "")
    if not _BOUNDARY.match(boundary):
        raise DecodeError(f"multipart Content-Type without a valid boundary: {content_type}")
    # A delimiter is a line of its own; the line break before it belongs to it.
    delimiter = re.compile(
        rb"(?:\A|\r?\n)--" + re.escape(boundary.encode("ascii")) + rb"(--)?[ \t]*(?:\r?\n|\Z)"
    )
    parts: list[BodyPart] = []
    start: int | None = None
    for match in delimiter.finditer(body):
        if start is not None:
            parts.append(_body_part(body[start : match.start()]))
        if match.group(1):
            if not parts:
                raise DecodeError("multipart body has no parts")
            return parts
        start = match.end()
    raise DecodeError("multipart body ends without its closing delimiter (truncated?)")


def _body_part(raw: bytes) -> BodyPart:
    end = _HEADERS_END.search(raw)
    if raw.startswith((b"\r\n", b"\n")):  # no header fields at all
        header_block, body = b"", raw[2 if raw.startswith(b"\r\n") else 1 :]
    elif end is None:
        raise DecodeError("multipart part has no blank line after its header fields")
    else:
        header_block, body = raw[: end.start()], raw[end.end() :]
    try:
        text = header_block.decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError("multipart part header fields are not ASCII") from None
    headers: dict[str, str] = {}
    name = ""
    for line in text.replace("\r\n", "\n").split("\n") if text else []:
        if line[:1] in (" ", "\t") and name:  # a folded continuation
            headers[name] += " " + line.strip()
            continue
        field, colon, value = line.partition(":")
        if not colon or not field.strip():
            raise DecodeError(f"malformed multipart header field {line[:40]!r}")
        name = field.strip().lower()
        headers[name] = value.strip()
    return BodyPart(headers, body)


def decode_serverkeygen(body: bytes, content_type: str) -> ServerGeneratedKey:
    """The key and certificates of a serverkeygen answer (RFC 7030 4.4.2)."""
    if wire.media_type(content_type) != MULTIPART_MIXED:
        raise DecodeError(f"expected {MULTIPART_MIXED}, got {content_type or 'no Content-Type'}")
    key_parts: list[BodyPart] = []
    cert_parts: list[BodyPart] = []
    for part in split_multipart(body, content_type):
        media = wire.media_type(part.content_type)
        smime_type = content_type_parameters(part.content_type).get("smime-type", "").lower()
        if media == wire.PKCS8:
            key_parts.append(part)
        elif media == wire.PKCS7_MIME and smime_type == ENCRYPTED_KEY_SMIME_TYPE:
            raise DecodeError(
                "the server sent the private key encrypted (CMS EnvelopedData); "
                "this client takes unencrypted keys only (over TLS, RFC 7030 4.4.2)"
            )
        elif media == wire.PKCS7_MIME:
            cert_parts.append(part)
        else:
            raise DecodeError(f"unexpected part {part.content_type!r} in a serverkeygen answer")
    if len(key_parts) != 1 or len(cert_parts) != 1:
        raise DecodeError(
            f"a serverkeygen answer has one {wire.PKCS8} part and one {wire.PKCS7_MIME} part, "
            f"got {len(key_parts)} and {len(cert_parts)}"
        )
    certificates = cms.decode_certs_only(wire.decode_base64_body(cert_parts[0].body))
    return ServerGeneratedKey(
        _private_key(wire.decode_base64_body(key_parts[0].body)), tuple(certificates)
    )


def _private_key(der: bytes) -> keys.PrivateKey:
    if not _is_pkcs8(der):
        raise DecodeError("the key part is not PKCS#8 (RFC 7030 4.4.2; PKCS#1 or SEC1 is not)")
    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError) as exc:
        raise DecodeError("the key part is not an unencrypted DER PKCS#8 private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise DecodeError(f"the server sent a {type(key).__name__}, not an EC or RSA key")
    keys.key_type_of(key.public_key())
    return key


def _is_pkcs8(der: bytes) -> bool:
    """PrivateKeyInfo (RFC 5958): SEQUENCE { version INTEGER, AlgorithmIdentifier
    SEQUENCE, ... }. PKCS#1 and SEC1 keys have an INTEGER or OCTET STRING second."""
    try:
        tag, content, end = der_codec.read_tlv(der)
        if tag != 0x30 or end != len(der):
            return False
        elements = list(der_codec.iter_elements(content))
    except DecodeError:
        return False
    return len(elements) >= 3 and elements[0][0] == 0x02 and elements[1][0] == 0x30
