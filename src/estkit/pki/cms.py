"""Certs-only CMS (RFC 5652 SignedData with no signers), as EST carries certificates."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from estkit.pki.der import SEQUENCE, SET, encode_oid, read_tlv
from estkit.pki.errors import DecodeError

SIGNED_DATA = x509.ObjectIdentifier("1.2.840.113549.1.7.2")
_INTEGER = 0x02
_CONSTRUCTED = 0x20
_EXPLICIT_CONTENT = 0xA0  # ContentInfo's [0] EXPLICIT content
_CERTIFICATES = 0xA0  # SignedData's [0] IMPLICIT CertificateSet
_CRLS = 0xA1  # SignedData's [1] IMPLICIT RevocationInfoChoices
_INDEFINITE = 0x80
_END_OF_CONTENTS = b"\x00\x00"
# Bouncy Castle nests about five indefinite-length levels; far deeper is an attack.
_MAX_DEPTH = 32


def encode_certs_only(certs: Sequence[x509.Certificate]) -> bytes:
    """DER of a certs-only CMS holding ``certs``.

    DER sorts the certificate SET OF, so the order given is not kept: readers
    order certificates by signature (``certs.build_path``), not by position.
    """
    # Imported here: cryptography's pkcs7 module imports the stdlib email package
    # (S/MIME), which a device that only decodes never needs in memory.
    from cryptography.hazmat.primitives.serialization import pkcs7

    if not certs:
        raise ValueError("a certs-only message needs at least one certificate")
    return pkcs7.serialize_certificates(list(certs), Encoding.DER)


def decode_certs_only(der: bytes) -> list[x509.Certificate]:
    """The certificates of a certs-only CMS, in wire order.

    DER, or BER as other servers write it: OpenSSL leaves the SET OF unsorted,
    Bouncy Castle (many Java EST servers) uses indefinite lengths. Each
    certificate itself must be DER, as X.509 requires.
    """
    try:
        certs = _certificates(der)
    except DecodeError as exc:
        raise DecodeError(f"not a certs-only CMS message: {exc}") from exc
    if not certs:
        raise DecodeError("certs-only CMS message holds no certificate")
    return certs


def _certificates(message: bytes) -> list[x509.Certificate]:
    tag, content_info, end = _read_ber(message, 0)
    if tag != SEQUENCE or end != len(message):
        raise DecodeError("not one ContentInfo")
    fields = list(_elements(content_info))
    if (
        len(fields) != 2
        or fields[0][2] != encode_oid(SIGNED_DATA)
        or fields[1][0] != _EXPLICIT_CONTENT
    ):
        raise DecodeError("content type is not SignedData")
    wrapped = list(_elements(fields[1][1]))
    if len(wrapped) != 1 or wrapped[0][0] != SEQUENCE:
        raise DecodeError("malformed SignedData")
    # version, digestAlgorithms, encapContentInfo, [0] certificates, [1] crls, signerInfos
    signed_data = list(_elements(wrapped[0][1]))
    tags = [t for t, _, _ in signed_data]
    if (
        len(tags) < 4
        or tags[:3] != [_INTEGER, SET, SEQUENCE]
        or tags[-1] != SET
        or tags[3:-1] not in ([], [_CERTIFICATES], [_CRLS], [_CERTIFICATES, _CRLS])
    ):
        raise DecodeError("malformed SignedData")
    certificate_set = next((value for t, value, _ in signed_data if t == _CERTIFICATES), b"")
    return [_certificate(t, encoded) for t, _, encoded in _elements(certificate_set)]


def _certificate(tag: int, encoded: bytes) -> x509.Certificate:
    if tag != SEQUENCE:  # the other CertificateChoices: attribute and other certificates
        raise DecodeError("a certificate choice other than X.509")
    try:
        return x509.load_der_x509_certificate(encoded)
    except ValueError as exc:
        raise DecodeError("malformed certificate") from exc


def _elements(content: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """Each (tag, content, whole encoding) of a constructed element's content."""
    offset = 0
    while offset < len(content):
        tag, value, end = _read_ber(content, offset)
        yield tag, value, content[offset:end]
        offset = end


def _read_ber(data: bytes, offset: int, depth: int = 0) -> tuple[int, bytes, int]:
    """``der.read_tlv``, plus BER's indefinite length: a constructed element whose
    content runs to an end-of-contents marker (00 00) after its last element."""
    if offset + 1 >= len(data) or data[offset + 1] != _INDEFINITE:
        return read_tlv(data, offset)
    if not data[offset] & _CONSTRUCTED:
        raise DecodeError("indefinite length on a primitive element")
    if depth >= _MAX_DEPTH:
        raise DecodeError("nested too deeply")
    start = pos = offset + 2
    while data[pos : pos + 2] != _END_OF_CONTENTS:
        _, _, pos = _read_ber(data, pos, depth + 1)  # raises at the end of data
    return data[offset], data[start:pos], pos + 2
