"""CSR attributes (RFC 7030 4.5.2): ``CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID``.

estkit only ever tells clients which OIDs it wants (``AttrOrOID`` as a bare
OID, e.g. the signature algorithm or challengePassword); attributes with
values are decoded for clients that talk to other servers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from estkit.pki import der
from estkit.pki.errors import DecodeError


@dataclass(frozen=True, slots=True)
class CsrAttribute:
    """One entry: a bare OID, or an attribute type with its DER values."""

    oid: x509.ObjectIdentifier
    values: tuple[bytes, ...] | None = None


def encode_csrattrs(oids: Sequence[x509.ObjectIdentifier]) -> bytes:
    """DER of a CsrAttrs listing bare OIDs."""
    return der.tlv(der.SEQUENCE, b"".join(der.encode_oid(o) for o in oids))


def decode_csrattrs(data: bytes) -> list[CsrAttribute]:
    """Decode CsrAttrs DER (empty list for an empty SEQUENCE)."""
    tag, content, end = der.read_tlv(data)
    if tag != der.SEQUENCE or end != len(data):
        raise DecodeError("csrattrs is not a single DER SEQUENCE")
    out: list[CsrAttribute] = []
    for tag, value in der.iter_elements(content):
        if tag == der.OID:
            out.append(CsrAttribute(der.decode_oid(value)))
        elif tag == der.SEQUENCE:
            parts = list(der.iter_elements(value))
            if len(parts) != 2 or parts[0][0] != der.OID or parts[1][0] != der.SET:
                raise DecodeError("csrattrs Attribute must be SEQUENCE { OID, SET }")
            values = tuple(der.tlv(t, v) for t, v in der.iter_elements(parts[1][1]))
            out.append(CsrAttribute(der.decode_oid(parts[0][1]), values))
        else:
            raise DecodeError(f"unexpected tag 0x{tag:02x} in csrattrs")
    return out
