"""TLS channel binding in a CSR (RFC 7030 3.5): proof that the CSR was made for this connection.

The binding is ``tls-unique`` (RFC 5929: the first Finished message of the
handshake) on TLS 1.2 and ``tls-exporter`` (RFC 9266: 32 bytes exported with
the label ``EXPORTER-Channel-Binding`` and no context) on TLS 1.3. The client
puts base64 of it in the CSR's challengePassword attribute; the server compares
that with its own view of the connection. A TLS-terminating proxy breaks both.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import AttributeOID

CHALLENGE_PASSWORD = AttributeOID.CHALLENGE_PASSWORD  # 1.2.840.113549.1.9.7
TLS_UNIQUE = "tls-unique"
TLS_EXPORTER = "tls-exporter"
EXPORTER_LABEL = b"EXPORTER-Channel-Binding"
EXPORTER_LENGTH = 32
_WHITESPACE = b" \t\r\n\v\f"


@dataclass(frozen=True, slots=True)
class ChannelBinding:
    """One TLS connection's binding: its type (``TLS_UNIQUE``, ``TLS_EXPORTER``) and bytes."""

    kind: str
    data: bytes


def binding_kind(tls_version: str) -> str | None:
    """The binding a TLS version offers ("TLSv1.2", "TLSv1.3"), None for others."""
    return {"TLSv1.2": TLS_UNIQUE, "TLSv1.3": TLS_EXPORTER}.get(tls_version)


def encode_binding(data: bytes) -> str:
    """The challengePassword value that carries ``data``: standard base64, one line."""
    return base64.b64encode(data).decode("ascii")


def challenge_password(csr: x509.CertificateSigningRequest) -> bytes | None:
    """The raw value of the CSR's challengePassword attribute, None when it has none."""
    try:
        return csr.attributes.get_attribute_for_oid(CHALLENGE_PASSWORD).value
    except x509.AttributeNotFound:
        return None


def carries_binding(password: bytes, binding: bytes) -> bool:
    """Whether ``password`` is base64 of ``binding`` (surrounding whitespace ignored);
    compared in constant time."""
    try:
        claimed = base64.b64decode(password.strip(_WHITESPACE), validate=True)
    except (binascii.Error, ValueError):
        return False
    return bool(binding) and hmac.compare_digest(claimed, binding)
