"""The few DER primitives cryptography does not expose (csrattrs, raw names)."""

from __future__ import annotations

from collections.abc import Iterator

from cryptography import x509

from estkit.pki.errors import DecodeError

SEQUENCE = 0x30
SET = 0x31
OID = 0x06


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element."""
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def read_tlv(data: bytes, offset: int = 0) -> tuple[int, bytes, int]:
    """Read one element at ``offset``: (tag, content, offset after it)."""
    try:
        tag = data[offset]
        first = data[offset + 1]
        pos = offset + 2
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count == 0 or count > 4:
                raise DecodeError("unsupported DER length")
            length = int.from_bytes(data[pos : pos + count], "big")
            pos += count
    except IndexError as exc:
        raise DecodeError("truncated DER") from exc
    end = pos + length
    if end > len(data):
        raise DecodeError("truncated DER")
    return tag, data[pos:end], end


def iter_elements(content: bytes) -> Iterator[tuple[int, bytes]]:
    """Each (tag, content) of a constructed element's content."""
    offset = 0
    while offset < len(content):
        tag, value, offset = read_tlv(content, offset)
        yield tag, value


def encode_oid(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    body = bytearray()
    # The first two arcs share one sub-identifier, base-128 like the rest (2.999 needs two bytes).
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return tlv(OID, bytes(body))


def decode_oid(content: bytes) -> x509.ObjectIdentifier:
    if not content:
        raise DecodeError("empty OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if content[-1] & 0x80:
        raise DecodeError("truncated OBJECT IDENTIFIER")
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return x509.ObjectIdentifier(".".join(str(a) for a in head + arcs[1:]))
