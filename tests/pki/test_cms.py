"""Certs-only CMS: what /cacerts and the enroll responses carry."""

from __future__ import annotations

import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from estkit.pki import der
from estkit.pki.certs import build_path, certs_to_pem
from estkit.pki.cms import decode_certs_only, encode_certs_only
from estkit.pki.errors import DecodeError

ORDERS = {
    "ok/one-cert": ("leaf",),
    "ok/leaf-first": ("leaf", "issuing", "root"),
    "ok/root-first": ("root", "issuing", "leaf"),
    "ok/mixed": ("issuing", "leaf", "root"),
}


@pytest.fixture(scope="module")
def by_role(ca):
    return {"leaf": ca.leaf(), "issuing": ca.issuing, "root": ca.root}


def der_set(certs: list[x509.Certificate]) -> set[bytes]:
    return {c.public_bytes(Encoding.DER) for c in certs}


@pytest.mark.parametrize("order", ORDERS.values(), ids=ORDERS.keys())
def test_decode_returns_every_encoded_certificate_exactly_once(by_role, order):
    certs = [by_role[r] for r in order]
    decoded = decode_certs_only(encode_certs_only(certs))
    assert len(decoded) == len(certs)
    assert der_set(decoded) == der_set(certs)


def test_encode_is_der_so_input_order_does_not_change_the_bytes(by_role):
    # DER sorts the SET OF certificates (pyca/cryptography#12005): order carries no meaning.
    orders = [o for o in ORDERS.values() if len(o) == 3]
    assert len({encode_certs_only([by_role[r] for r in o]) for o in orders}) == 1


def test_decoded_bundle_is_ordered_by_signature_with_build_path(ca, by_role):
    decoded = decode_certs_only(encode_certs_only([ca.root, by_role["leaf"], ca.issuing]))
    leaf = next(c for c in decoded if c == by_role["leaf"])
    others = [c for c in decoded if c != leaf]
    assert build_path(leaf, others, [ca.root]) == [by_role["leaf"], ca.issuing, ca.root]


def test_decode_keeps_wire_order_of_openssl_made_message_without_warning(
    by_role, openssl, tmp_path
):
    # OpenSSL, and so OpenSSL-based EST servers, writes the certificates unsorted (BER);
    # pytest runs with -W error, so a parser warning would fail here.
    der_order = decode_certs_only(encode_certs_only(list(by_role.values())))
    certs = der_order[::-1]  # surely not DER order
    bundle = tmp_path / "chain.pem"
    bundle.write_bytes(certs_to_pem(certs))
    out = tmp_path / "chain.p7"
    openssl("crl2pkcs7", "-nocrl", "-certfile", str(bundle), "-outform", "DER", "-out", str(out))
    assert decode_certs_only(out.read_bytes()) == certs


def test_openssl_prints_the_subject_of_every_certificate(ca, openssl):
    certs = [ca.leaf("dev-7"), ca.issuing, ca.root]
    printed = openssl(
        "pkcs7", "-inform", "DER", "-print_certs", "-noout", stdin=encode_certs_only(certs)
    )
    found = re.findall(r"^subject=\s*CN\s*=\s*(.+?)\s*$", printed, flags=re.MULTILINE)
    assert sorted(found) == ["dev-7", "estkit Test Issuing CA", "estkit Test Root CA"]


def test_encode_rejects_an_empty_list():
    with pytest.raises(ValueError, match="at least one"):
        encode_certs_only([])


def signed_data_without_certificates() -> bytes:
    signed_data = der.tlv(
        der.SEQUENCE,
        der.tlv(0x02, b"\x01")  # version
        + der.tlv(der.SET, b"")  # digestAlgorithms
        + der.tlv(der.SEQUENCE, der.encode_oid(x509.ObjectIdentifier("1.2.840.113549.1.7.1")))
        + der.tlv(der.SET, b""),  # signerInfos
    )
    return der.tlv(
        der.SEQUENCE,
        der.encode_oid(x509.ObjectIdentifier("1.2.840.113549.1.7.2")) + der.tlv(0xA0, signed_data),
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda ca: b"",
        lambda ca: b"garbage",
        lambda ca: b"\x30\x00",
        lambda ca: ca.root.public_bytes(Encoding.DER),
        lambda ca: encode_certs_only([ca.root])[:-10],
        lambda ca: certs_to_pem([ca.root]),
        lambda ca: signed_data_without_certificates(),
    ],
    ids=[
        "fail/empty",
        "fail/garbage",
        "fail/empty-sequence",
        "fail/bare-certificate",
        "fail/truncated",
        "fail/pem-not-der",
        "fail/no-certificates",
    ],
)
def test_decode_rejects_what_is_not_a_certs_only_message(ca, make):
    with pytest.raises(DecodeError):
        decode_certs_only(make(ca))
