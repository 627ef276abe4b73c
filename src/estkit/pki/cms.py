"""Certs-only CMS (RFC 5652 SignedData with no signers), as EST carries certificates."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from estkit.pki.errors import DecodeError


def encode_certs_only(certs: Sequence[x509.Certificate]) -> bytes:
    """DER of a certs-only CMS holding ``certs``.

    DER sorts the certificate SET OF, so the order given is not kept: readers
    order certificates by signature (``certs.build_path``), not by position.
    """
    if not certs:
        raise ValueError("a certs-only message needs at least one certificate")
    return pkcs7.serialize_certificates(list(certs), Encoding.DER)


def decode_certs_only(der: bytes) -> list[x509.Certificate]:
    """The certificates of a certs-only CMS, in wire order (DER, or BER as OpenSSL writes it)."""
    try:
        with warnings.catch_warnings():
            # OpenSSL writes the SET OF unsorted (BER); cryptography parses it but warns.
            warnings.filterwarnings(
                "ignore", "PKCS#7 certificates could not be parsed as DER", UserWarning
            )
            certs = pkcs7.load_der_pkcs7_certificates(der)
    except ValueError as exc:
        raise DecodeError("not a certs-only CMS message") from exc
    if not certs:
        raise DecodeError("certs-only CMS message holds no certificate")
    return certs
