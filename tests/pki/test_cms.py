"""Certs-only CMS: what /cacerts and the enroll responses carry."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from estkit.pki import der
from estkit.pki.certs import build_path, certs_to_pem
from estkit.pki.cms import SIGNED_DATA, decode_certs_only, encode_certs_only
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


def indefinite(encoded: bytes, levels: int) -> bytes:
    """``encoded`` with its constructed SEQUENCE, SET and [0] elements, ``levels`` deep,
    written with BER's indefinite length (``30 80 ... 00 00``), as Bouncy Castle does."""
    out, offset = b"", 0
    while offset < len(encoded):
        tag, content, end = der.read_tlv(encoded, offset)
        if levels > 0 and tag in (der.SEQUENCE, der.SET, 0xA0):
            out += bytes([tag, 0x80]) + indefinite(content, levels - 1) + b"\x00\x00"
        else:
            out += encoded[offset:end]
        offset = end
    return out


def reference_decode(message: bytes) -> list[x509.Certificate]:
    """cryptography's own reader, which warns when it falls back to BER."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pkcs7.load_der_pkcs7_certificates(message)


def test_decode_reads_indefinite_length_ber_as_java_servers_write_it(by_role):
    certs = decode_certs_only(encode_certs_only(list(by_role.values())))
    # ContentInfo, its [0], SignedData and SignedData's fields (the certificate set among
    # them); the certificates themselves stay DER, as X.509 requires.
    ber = indefinite(encode_certs_only(certs), 4)
    assert ber[:2] == b"\x30\x80"
    assert decode_certs_only(ber) == certs
    assert reference_decode(ber) == certs


@pytest.mark.parametrize(
    "make",
    [
        lambda certs: encode_certs_only(certs),
        lambda certs: indefinite(encode_certs_only(certs), 3),
    ],
    ids=["ok/der", "ok/ber-indefinite"],
)
def test_decode_agrees_with_cryptographys_reader(by_role, make):
    message = make(list(by_role.values()))
    assert decode_certs_only(message) == reference_decode(message)


def test_decoding_does_not_load_cryptographys_smime_module(by_role):
    # cryptography's pkcs7 module imports email's S/MIME machinery: about 0.5 MB that a
    # device, which only decodes, would carry for its whole life.
    code = (
        "import json, sys\n"
        "from estkit.pki.cms import decode_certs_only\n"
        "certs = decode_certs_only(bytes.fromhex(sys.argv[1]))\n"
        "print(json.dumps([len(certs), sorted(sys.modules)]))\n"
    )
    message = encode_certs_only(list(by_role.values()))
    done = subprocess.run(
        [sys.executable, "-c", code, message.hex()], capture_output=True, text=True, check=True
    )
    count, modules = json.loads(done.stdout)
    assert count == 3
    assert "cryptography.hazmat.primitives.serialization.pkcs7" not in modules
    assert "email.policy" not in modules


def signed_data(*fields: bytes) -> bytes:
    """A ContentInfo holding a SignedData of ``fields``."""
    return der.tlv(
        der.SEQUENCE,
        der.encode_oid(SIGNED_DATA) + der.tlv(0xA0, der.tlv(der.SEQUENCE, b"".join(fields))),
    )


VERSION = der.tlv(0x02, b"\x01")
DIGEST_ALGORITHMS = der.tlv(der.SET, b"")
ENCAP_CONTENT_INFO = der.tlv(
    der.SEQUENCE, der.encode_oid(x509.ObjectIdentifier("1.2.840.113549.1.7.1"))
)
SIGNER_INFOS = der.tlv(der.SET, b"")


def certs_only(certificate_set: bytes) -> bytes:
    """A certs-only message whose [0] certificate set holds ``certificate_set``."""
    return signed_data(
        VERSION, DIGEST_ALGORITHMS, ENCAP_CONTENT_INFO, der.tlv(0xA0, certificate_set), SIGNER_INFOS
    )


def signed_data_without_certificates() -> bytes:
    return signed_data(VERSION, DIGEST_ALGORITHMS, ENCAP_CONTENT_INFO, SIGNER_INFOS)


def root_der(ca) -> bytes:
    return ca.root.public_bytes(Encoding.DER)


def nested_indefinite(depth: int) -> bytes:
    return b"\x30\x80" * depth + b"\x00\x00" * depth


REJECTED = {
    "fail/empty": (lambda ca: b"", "truncated"),
    "fail/garbage": (lambda ca: b"garbage", "truncated"),
    "fail/empty-sequence": (lambda ca: b"\x30\x00", "not SignedData"),
    "fail/bare-certificate": (root_der, "not SignedData"),
    "fail/truncated": (lambda ca: encode_certs_only([ca.root])[:-10], "truncated"),
    "fail/pem-not-der": (lambda ca: certs_to_pem([ca.root]), "not one ContentInfo"),
    "fail/no-certificates": (lambda ca: signed_data_without_certificates(), "no certificate"),
    "fail/empty-certificate-set": (lambda ca: certs_only(b""), "no certificate"),
    "fail/trailing-bytes": (
        lambda ca: encode_certs_only([ca.root]) + b"\x00",
        "not one ContentInfo",
    ),
    "fail/not-signed-data": (
        lambda ca: der.tlv(
            der.SEQUENCE,
            der.encode_oid(x509.ObjectIdentifier("1.2.840.113549.1.7.1"))
            + der.tlv(0xA0, der.tlv(0x04, b"data")),
        ),
        "not SignedData",
    ),
    "fail/signed-data-missing-fields": (
        lambda ca: signed_data(VERSION, DIGEST_ALGORITHMS, der.tlv(0xA0, root_der(ca))),
        "malformed SignedData",
    ),
    "fail/signed-data-fields-out-of-order": (
        lambda ca: signed_data(
            VERSION,
            ENCAP_CONTENT_INFO,
            DIGEST_ALGORITHMS,
            der.tlv(0xA0, root_der(ca)),
            SIGNER_INFOS,
        ),
        "malformed SignedData",
    ),
    "fail/attribute-certificate-choice": (
        lambda ca: certs_only(der.tlv(0xA1, der.read_tlv(root_der(ca))[1])),
        "other than X.509",
    ),
    "fail/malformed-certificate": (
        lambda ca: certs_only(der.tlv(der.SEQUENCE, b"\x02\x01\x01")),
        "malformed certificate",
    ),
    "fail/ber-without-end-of-contents": (
        lambda ca: indefinite(encode_certs_only([ca.root]), 3)[:-2],
        "truncated",
    ),
    "fail/ber-indefinite-primitive": (lambda ca: b"\x04\x80\x00\x00", "primitive"),
    "fail/ber-certificate": (
        lambda ca: indefinite(encode_certs_only([ca.root]), 5),
        "malformed certificate",
    ),
    "fail/ber-nested-too-deeply": (lambda ca: nested_indefinite(10_000), "nested too deeply"),
}


@pytest.mark.parametrize(("make", "reason"), REJECTED.values(), ids=REJECTED.keys())
def test_decode_rejects_what_is_not_a_certs_only_message(ca, make, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_certs_only(make(ca))
