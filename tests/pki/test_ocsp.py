"""OCSP requests and responses as values (RFC 6960, RFC 8954 nonces): no clock, no store.

Requests are made with ``cryptography``'s builder, as a client makes them; responses
are read back with ``cryptography`` and checked against the issuer's key.
"""

from __future__ import annotations

import base64
import datetime as dt
import urllib.parse

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from estkit.pki.der import SEQUENCE, iter_elements, read_tlv, tlv
from estkit.pki.keys import generate_key
from estkit.pki.ocsp import (
    GOOD,
    HASHES,
    MAX_NONCE_BYTES,
    UNKNOWN,
    CertId,
    CertState,
    MalformedRequest,
    build_response,
    issuer_hashes,
    parse_request,
    request_from_path,
    unsuccessful,
)
from estkit.pki.profiles import issue_ca
from pki.conftest import NOW, Ca
from testpki import cn_name

WEEK = dt.timedelta(days=7)


def request_der(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    *,
    algorithm: hashes.HashAlgorithm | None = None,
    nonce: bytes | None = None,
) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm or HASHES["sha1"]())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(Encoding.DER)


def respond(
    ca: Ca,
    leaf: x509.Certificate,
    state: CertState,
    *,
    nonce: bytes | None = None,
    algorithm: str = "sha1",
) -> ocsp.OCSPResponse:
    query = parse_request(request_der(leaf, ca.issuing, algorithm=HASHES[algorithm](), nonce=nonce))
    der = build_response(
        cert_id=query.cert_id,
        state=state,
        issuer=ca.issuing,
        issuer_key=ca.issuing_key,
        this_update=NOW,
        next_update=NOW + WEEK,
        nonce=query.nonce,
    )
    return ocsp.load_der_ocsp_response(der)


def signed_by(response: ocsp.OCSPResponse, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    algorithm = response.signature_hash_algorithm
    assert algorithm is not None
    try:
        key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))
    except Exception:
        return False
    return True


# -- requests -----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", sorted(HASHES), ids=lambda a: f"ok/{a}")
def test_a_request_names_the_issuer_by_the_hashes_of_its_name_and_key(
    ca: Ca, algorithm: str
) -> None:
    leaf = ca.leaf()

    query = parse_request(request_der(leaf, ca.issuing, algorithm=HASHES[algorithm]()))

    assert query.cert_id == CertId(
        algorithm, *issuer_hashes(ca.issuing, algorithm), leaf.serial_number
    )
    assert query.nonce is None


@pytest.mark.parametrize("key_type", ["ec-p384", "rsa-2048"], ids=lambda k: f"ok/{k}-issuer")
def test_issuer_key_hash_is_the_hash_of_the_public_key_bits_whatever_the_key_type(
    ca: Ca, key_type: str
) -> None:
    key = generate_key(key_type)
    issuer = issue_ca(
        subject=cn_name(f"{key_type} CA"), public_key=key.public_key(), issuer=None,
        issuer_key=key, validity=WEEK, now=NOW, path_length=0,
    )  # fmt: skip
    for algorithm in HASHES:
        built = ocsp.OCSPRequestBuilder().add_certificate(issuer, issuer, HASHES[algorithm]())
        request = built.build()  # its own issuer: the name hashed is its subject
        assert issuer_hashes(issuer, algorithm) == (
            request.issuer_name_hash,
            request.issuer_key_hash,
        )


@pytest.mark.parametrize("size", [1, 16, MAX_NONCE_BYTES], ids=lambda n: f"ok/{n}-octets")
def test_a_nonce_of_1_to_32_octets_is_read(ca: Ca, size: int) -> None:
    nonce = bytes(range(size))
    assert parse_request(request_der(ca.leaf(), ca.issuing, nonce=nonce)).nonce == nonce


def _two_certificates(ca: Ca) -> bytes:
    """One OCSPRequest asking about two certificates (cryptography builds one only)."""
    der = request_der(ca.leaf(), ca.issuing)
    _, outer, _ = read_tlv(der)  # OCSPRequest
    _, tbs, _ = read_tlv(outer)  # TBSRequest: no version, no name, no extensions
    _, request_list, _ = read_tlv(tbs)  # SEQUENCE OF Request: one
    assert tlv(SEQUENCE, tlv(SEQUENCE, tlv(SEQUENCE, request_list))) == der
    return tlv(SEQUENCE, tlv(SEQUENCE, tlv(SEQUENCE, request_list * 2)))


def _nonce_twice(ca: Ca) -> bytes:
    """A request whose extensions hold the nonce twice (cryptography builds it once)."""
    der = request_der(ca.leaf(), ca.issuing, nonce=b"n" * 16)
    _, outer, _ = read_tlv(der)
    _, tbs, _ = read_tlv(outer)
    (list_tag, request_list), (ext_tag, explicit) = iter_elements(tbs)
    _, extensions, _ = read_tlv(explicit)
    twice = tlv(ext_tag, tlv(SEQUENCE, extensions * 2))
    return tlv(SEQUENCE, tlv(SEQUENCE, tlv(list_tag, request_list) + twice))


@pytest.mark.parametrize(
    "case",
    [
        "garbage",
        "empty",
        "truncated",
        "two-certificates",
        "empty-nonce",
        "long-nonce",
        "nonce-twice",
    ],
    ids=lambda c: f"fail/{c}",
)
def test_what_is_not_a_one_certificate_request_is_malformed(ca: Ca, case: str) -> None:
    der = {
        "garbage": lambda: b"not DER at all",
        "empty": lambda: b"",
        "truncated": lambda: request_der(ca.leaf(), ca.issuing)[:-5],
        "two-certificates": lambda: _two_certificates(ca),
        "empty-nonce": lambda: request_der(ca.leaf(), ca.issuing, nonce=b""),
        "long-nonce": lambda: request_der(ca.leaf(), ca.issuing, nonce=b"n" * 33),
        "nonce-twice": lambda: _nonce_twice(ca),
    }[case]()

    with pytest.raises(MalformedRequest):
        parse_request(der)


# -- GET (RFC 6960 A.1) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "encode",
    [
        lambda der: urllib.parse.quote(base64.b64encode(der).decode(), safe=""),
        lambda der: base64.b64encode(der).decode(),  # slashes and '+' left as they are
        lambda der: base64.urlsafe_b64encode(der).decode().rstrip("="),
    ],
    ids=["ok/url-encoded", "ok/not-url-encoded", "ok/url-safe-unpadded"],
)
def test_a_get_path_gives_back_the_request(ca: Ca, encode: object) -> None:
    der = request_der(ca.leaf(), ca.issuing, nonce=b"\xfb\xff" * 8)  # '+' and '/' in base64
    assert callable(encode)
    assert request_from_path(encode(der)) == der


@pytest.mark.parametrize("encoded", ["", "%%%", "a", "!!!!"], ids=lambda e: f"fail/{e!r}")
def test_a_get_path_that_is_not_base64_is_malformed(encoded: str) -> None:
    with pytest.raises(MalformedRequest):
        request_from_path(encoded)


# -- responses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "status"),
    [
        (GOOD, ocsp.OCSPCertStatus.GOOD),
        (UNKNOWN, ocsp.OCSPCertStatus.UNKNOWN),
        (
            CertState(ocsp.OCSPCertStatus.REVOKED, NOW - dt.timedelta(hours=1)),
            ocsp.OCSPCertStatus.REVOKED,
        ),
    ],
    ids=["ok/good", "ok/unknown", "ok/revoked"],
)
def test_a_response_echoes_the_cert_id_and_is_signed_by_the_issuer(
    ca: Ca, state: CertState, status: ocsp.OCSPCertStatus
) -> None:
    leaf = ca.leaf()

    response = respond(ca, leaf, state)

    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.certificate_status is status
    assert response.serial_number == leaf.serial_number
    assert isinstance(response.hash_algorithm, hashes.SHA1)
    name_hash, key_hash = issuer_hashes(ca.issuing, "sha1")
    assert (response.issuer_name_hash, response.issuer_key_hash) == (name_hash, key_hash)
    assert response.responder_key_hash == key_hash and response.responder_name is None
    assert (response.this_update_utc, response.next_update_utc) == (NOW, NOW + WEEK)
    assert response.certificates == []
    assert signed_by(response, ca.issuing)
    assert not signed_by(response, ca.root)


def test_a_revoked_response_carries_the_time_and_reason(ca: Ca) -> None:
    at = NOW - dt.timedelta(minutes=3)
    state = CertState(ocsp.OCSPCertStatus.REVOKED, at, x509.ReasonFlags.key_compromise)

    response = respond(ca, ca.leaf(), state)

    assert response.revocation_time_utc == at
    assert response.revocation_reason is x509.ReasonFlags.key_compromise


def test_a_response_answers_in_the_hash_algorithm_of_the_request(ca: Ca) -> None:
    response = respond(ca, ca.leaf(), GOOD, algorithm="sha256")
    assert isinstance(response.hash_algorithm, hashes.SHA256)
    assert response.issuer_key_hash == issuer_hashes(ca.issuing, "sha256")[1]


@pytest.mark.parametrize("nonce", [None, b"\x01", b"n" * 32], ids=["ok/none", "ok/1", "ok/32"])
def test_the_nonce_is_echoed_when_present(ca: Ca, nonce: bytes | None) -> None:
    response = respond(ca, ca.leaf(), GOOD, nonce=nonce)
    echoed = [e.value.nonce for e in response.extensions if isinstance(e.value, x509.OCSPNonce)]
    assert echoed == ([] if nonce is None else [nonce])


@pytest.mark.parametrize(
    "status",
    [
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
        ocsp.OCSPResponseStatus.UNAUTHORIZED,
        ocsp.OCSPResponseStatus.TRY_LATER,
        ocsp.OCSPResponseStatus.INTERNAL_ERROR,
    ],
    ids=lambda s: f"ok/{s.name.lower()}",
)
def test_an_unsuccessful_response_is_its_status_alone(status: ocsp.OCSPResponseStatus) -> None:
    response = ocsp.load_der_ocsp_response(unsuccessful(status))
    assert response.response_status is status


@pytest.mark.parametrize(
    "case", ["next-before-this", "unknown-algorithm"], ids=lambda c: f"fail/{c}"
)
def test_build_response_refuses_values_it_cannot_answer_with(ca: Ca, case: str) -> None:
    cert_id = parse_request(request_der(ca.leaf(), ca.issuing)).cert_id
    next_update = NOW + WEEK
    if case == "next-before-this":
        next_update = NOW
    else:
        cert_id = CertId("md5", cert_id.issuer_name_hash, cert_id.issuer_key_hash, 1)
    with pytest.raises(ValueError):
        build_response(
            cert_id=cert_id, state=GOOD, issuer=ca.issuing, issuer_key=ca.issuing_key,
            this_update=NOW, next_update=next_update,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("status", "revoked_at", "reason"),
    [
        (ocsp.OCSPCertStatus.REVOKED, None, None),
        (ocsp.OCSPCertStatus.GOOD, NOW, None),
        (ocsp.OCSPCertStatus.GOOD, None, x509.ReasonFlags.key_compromise),
    ],
    ids=["fail/revoked-without-time", "fail/good-with-time", "fail/good-with-reason"],
)
def test_a_cert_state_is_consistent(
    status: ocsp.OCSPCertStatus, revoked_at: dt.datetime | None, reason: x509.ReasonFlags | None
) -> None:
    with pytest.raises(ValueError):
        CertState(status, revoked_at, reason)


# -- the AIA extension of issued certificates ------------------------------------------------


@pytest.mark.parametrize(
    "urls",
    [(), ("http://ocsp.example/ocsp",), ("http://a.example/ocsp", "http://b.example/ocsp")],
    ids=["ok/none", "ok/one", "ok/two"],
)
def test_issue_leaf_names_its_ocsp_urls_in_the_aia_extension(ca: Ca, urls: tuple[str, ...]) -> None:
    cert = ca.leaf(ocsp_urls=urls)
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    except x509.ExtensionNotFound:
        assert urls == ()
        return
    assert not aia.critical
    assert [(d.access_method, d.access_location.value) for d in aia.value] == [
        (x509.oid.AuthorityInformationAccessOID.OCSP, url) for url in urls
    ]
