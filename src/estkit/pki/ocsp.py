"""OCSP (RFC 6960) requests and responses, built from values: no clock, store or sockets.

A request names a certificate by its CertID: a hash algorithm, the hashes of the
issuer's name and public key under it, and the serial number. ``parse_request``
reads one (one certificate per request, as ``cryptography`` reads them) with its
nonce; ``build_response`` signs the answer with the issuer's own key (RFC 6960
4.2.2.2: the CA that issued the certificate may sign), echoing the request's
CertID and nonce; ``unsuccessful`` is an error answer, which is never signed.

Nonce (RFC 8954): 1 to 32 octets, echoed in the response; a longer or empty one
makes the request malformed.
"""

from __future__ import annotations

import base64
import datetime as dt
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import ocsp

from estkit.pki.der import iter_elements, read_tlv
from estkit.pki.errors import DecodeError
from estkit.pki.keys import signature_hash

__all__ = [
    "GOOD",
    "HASHES",
    "MAX_NONCE_BYTES",
    "OCSP_REQUEST",
    "OCSP_RESPONSE",
    "UNKNOWN",
    "CertId",
    "CertState",
    "MalformedRequest",
    "OcspQuery",
    "build_response",
    "issuer_hashes",
    "parse_request",
    "request_from_path",
    "unsuccessful",
]

OCSP_REQUEST: Final = "application/ocsp-request"
OCSP_RESPONSE: Final = "application/ocsp-response"
# The CertID hash algorithms answered. SHA-1 is what OpenSSL and most clients send.
HASHES: Final[Mapping[str, type[hashes.HashAlgorithm]]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
MAX_NONCE_BYTES: Final = 32  # RFC 8954 2.1


class MalformedRequest(DecodeError):
    """Not an OCSP request this responder can read (``malformedRequest``)."""


@dataclass(frozen=True, slots=True)
class CertId:
    """What a request names (RFC 6960 4.1.1). ``algorithm`` is a ``HASHES`` name, or the
    request's own name for one not answered (then no issuer of ours matches)."""

    algorithm: str
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    serial: int


@dataclass(frozen=True, slots=True)
class OcspQuery:
    cert_id: CertId
    nonce: bytes | None = None


@dataclass(frozen=True, slots=True)
class CertState:
    """A certificate's status as a responder answers it (RFC 6960 2.2)."""

    status: ocsp.OCSPCertStatus
    revoked_at: dt.datetime | None = None
    reason: x509.ReasonFlags | None = None  # None: no reasonCode (unspecified)

    def __post_init__(self) -> None:
        revoked = self.status is ocsp.OCSPCertStatus.REVOKED
        if revoked != (self.revoked_at is not None):
            raise ValueError("revoked_at is required for a revoked status, and only for it")
        if self.reason is not None and not revoked:
            raise ValueError("a reason is only for a revoked status")


GOOD: Final = CertState(ocsp.OCSPCertStatus.GOOD)
UNKNOWN: Final = CertState(ocsp.OCSPCertStatus.UNKNOWN)


def parse_request(der: bytes) -> OcspQuery:
    """The certificate a DER OCSPRequest asks about, and its nonce; ``MalformedRequest``
    for anything else (bad DER, several certificates, a nonce out of RFC 8954's range)."""
    try:
        request = ocsp.load_der_ocsp_request(der)
        serial = request.serial_number
        name_hash, key_hash = request.issuer_name_hash, request.issuer_key_hash
        nonce_ext = request.extensions.get_extension_for_class(x509.OCSPNonce)
    except x509.ExtensionNotFound:
        nonce = None
    except Exception as exc:  # untrusted bytes: whatever the parser raises (ValueError,
        # NotImplementedError for several certificates, DuplicateExtension, ...)
        raise MalformedRequest(f"not a one-certificate OCSP request: {exc}") from None
    else:
        nonce = nonce_ext.value.nonce
        if not 1 <= len(nonce) <= MAX_NONCE_BYTES:
            raise MalformedRequest(
                f"nonce of {len(nonce)} octets; RFC 8954 allows 1 to {MAX_NONCE_BYTES}"
            )
    try:
        algorithm = request.hash_algorithm.name
    except UnsupportedAlgorithm:
        algorithm = "unsupported"
    return OcspQuery(CertId(algorithm, name_hash, key_hash, serial), nonce)


def issuer_hashes(issuer: x509.Certificate, algorithm: str) -> tuple[bytes, bytes]:
    """(issuerNameHash, issuerKeyHash) of ``issuer`` under a ``HASHES`` algorithm: the
    hashes of its DER subject and of its subjectPublicKey's bits (RFC 6960 4.1.1)."""
    try:
        kind = HASHES[algorithm]
    except KeyError:
        raise ValueError(f"hash algorithm {algorithm!r}: one of {', '.join(HASHES)}") from None

    def digest(data: bytes) -> bytes:
        h = hashes.Hash(kind())
        h.update(data)
        return h.finalize()

    spki = issuer.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    _, content, _ = read_tlv(spki)
    _, bits = list(iter_elements(content))[1]  # AlgorithmIdentifier, then the BIT STRING
    return digest(issuer.subject.public_bytes()), digest(bits[1:])  # less its unused-bits octet


def request_from_path(encoded: str) -> bytes:
    """The DER of a GET request's path after ``/ocsp/`` (RFC 6960 A.1: URL-encoded
    base64; the URL-safe alphabet, and slashes left unencoded, are accepted too)."""
    text = urllib.parse.unquote(encoded).translate(str.maketrans("-_", "+/"))
    text = text.strip().rstrip("=")
    if not text:
        raise MalformedRequest("no request in the URL")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError:  # binascii.Error is one
        raise MalformedRequest("the URL's request is not base64") from None


def build_response(
    *,
    cert_id: CertId,
    state: CertState,
    issuer: x509.Certificate,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    this_update: dt.datetime,
    next_update: dt.datetime,
    nonce: bytes | None = None,
) -> bytes:
    """A successful OCSPResponse (DER) for ``cert_id``, signed by its issuer, identified
    by key hash. ``cert_id`` is echoed as the request gave it."""
    if cert_id.algorithm not in HASHES:
        raise ValueError(f"hash algorithm {cert_id.algorithm!r}: one of {', '.join(HASHES)}")
    if next_update <= this_update:
        raise ValueError("next_update must come after this_update")
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response_by_hash(
            issuer_name_hash=cert_id.issuer_name_hash,
            issuer_key_hash=cert_id.issuer_key_hash,
            serial_number=cert_id.serial,
            algorithm=HASHES[cert_id.algorithm](),
            cert_status=state.status,
            this_update=this_update,
            next_update=next_update,
            revocation_time=state.revoked_at,
            revocation_reason=state.reason,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, issuer)
    )
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    response = builder.sign(issuer_key, signature_hash(issuer_key))
    return response.public_bytes(Encoding.DER)


def unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    """An unsigned error OCSPResponse: ``malformedRequest``, ``unauthorized``, ``tryLater``…"""
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(Encoding.DER)
