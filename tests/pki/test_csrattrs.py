"""CSR attributes (RFC 7030 4.5.2): ``CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID``."""

from __future__ import annotations

import base64
import re

import pytest
from cryptography import x509

from estkit.pki import der
from estkit.pki.csrattrs import CsrAttribute, decode_csrattrs, encode_csrattrs
from estkit.pki.errors import DecodeError

CHALLENGE_PASSWORD = x509.ObjectIdentifier("1.2.840.113549.1.9.7")
EXTENSION_REQUEST = x509.ObjectIdentifier("1.2.840.113549.1.9.14")
EC_PUBLIC_KEY = x509.ObjectIdentifier("1.2.840.10045.2.1")
SECP384R1 = x509.ObjectIdentifier("1.3.132.0.34")
ECDSA_SHA256 = x509.ObjectIdentifier("1.2.840.10045.4.3.2")
ECDSA_SHA384 = x509.ObjectIdentifier("1.2.840.10045.4.3.3")
MAC_ADDRESS = x509.ObjectIdentifier("1.3.6.1.1.1.1.22")

# (OIDs, what `openssl asn1parse` names each one)
OID_LISTS = {
    "ok/empty": ([], []),
    "ok/challenge-password": ([CHALLENGE_PASSWORD], ["challengePassword"]),
    "ok/signature-algorithm": ([ECDSA_SHA256], ["ecdsa-with-SHA256"]),
    "ok/several": (
        [CHALLENGE_PASSWORD, ECDSA_SHA384, SECP384R1, EXTENSION_REQUEST],
        ["challengePassword", "ecdsa-with-SHA384", "secp384r1", "Extension Request"],
    ),
    "ok/large-arcs": (
        [x509.ObjectIdentifier("1.3.6.1.4.1.311.21.20"), x509.ObjectIdentifier("1.2.3.4294967295")],
        ["1.3.6.1.4.1.311.21.20", "1.2.3.4294967295"],
    ),
    "ok/first-arcs-above-127": (
        [x509.ObjectIdentifier("2.999.1"), x509.ObjectIdentifier("2.48.1")],
        ["2.999.1", "2.48.1"],
    ),
}


@pytest.mark.parametrize(("oids", "labels"), OID_LISTS.values(), ids=OID_LISTS.keys())
def test_decode_reads_back_encode_as_bare_oids(oids, labels):
    assert decode_csrattrs(encode_csrattrs(oids)) == [CsrAttribute(o) for o in oids]


@pytest.mark.parametrize(("oids", "labels"), OID_LISTS.values(), ids=OID_LISTS.keys())
def test_openssl_asn1parse_reads_encode_as_a_sequence_of_objects(openssl, oids, labels):
    printed = openssl("asn1parse", "-inform", "DER", stdin=encode_csrattrs(oids))
    lines = printed.strip().splitlines()
    assert re.search(r"d=0 .* cons: SEQUENCE", lines[0])
    objects = [re.search(r"prim: OBJECT\s+:(.*?)\s*$", line) for line in lines[1:]]
    assert all(o is not None for o in objects), printed
    assert [o.group(1) for o in objects if o is not None] == labels


def test_encode_of_challenge_password_is_the_expected_der():
    assert encode_csrattrs([CHALLENGE_PASSWORD]) == bytes.fromhex("300b06092a864886f70d010907")


def test_decode_reads_the_rfc7030_example():
    # RFC 7030 section 4.5.2: challengePassword, an EC key on P-384, a macAddress
    # extension request, and ecdsa-with-SHA384.
    body = (
        "MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJ"
        "BgcrBgEBAQEWBggqhkjOPQQDAw=="
    )
    assert decode_csrattrs(base64.b64decode(body)) == [
        CsrAttribute(CHALLENGE_PASSWORD),
        CsrAttribute(EC_PUBLIC_KEY, (bytes.fromhex("06052b81040022"),)),  # secp384r1
        CsrAttribute(EXTENSION_REQUEST, (bytes.fromhex("06072b060101010116"),)),  # macAddress
        CsrAttribute(ECDSA_SHA384),
    ]


def attribute(oid: x509.ObjectIdentifier, *values: bytes) -> bytes:
    return der.tlv(der.SEQUENCE, der.encode_oid(oid) + der.tlv(der.SET, b"".join(values)))


UTF8_VALUE = der.tlv(0x0C, b"dev-1")
LONG_VALUE = der.tlv(0x04, bytes(300))  # long-form length survives the round trip

WITH_VALUES = {
    "ok/one-value": (
        [attribute(EC_PUBLIC_KEY, der.encode_oid(SECP384R1))],
        [(EC_PUBLIC_KEY, (der.encode_oid(SECP384R1),))],
    ),
    "ok/two-values": (
        [attribute(EXTENSION_REQUEST, der.encode_oid(MAC_ADDRESS), UTF8_VALUE)],
        [(EXTENSION_REQUEST, (der.encode_oid(MAC_ADDRESS), UTF8_VALUE))],
    ),
    "ok/empty-set": ([attribute(CHALLENGE_PASSWORD)], [(CHALLENGE_PASSWORD, ())]),
    "ok/long-value": (
        [attribute(CHALLENGE_PASSWORD, LONG_VALUE)],
        [(CHALLENGE_PASSWORD, (LONG_VALUE,))],
    ),
    "ok/mixed-with-bare-oids": (
        [der.encode_oid(ECDSA_SHA256), attribute(EC_PUBLIC_KEY, der.encode_oid(SECP384R1))],
        [(ECDSA_SHA256, None), (EC_PUBLIC_KEY, (der.encode_oid(SECP384R1),))],
    ),
}


@pytest.mark.parametrize(("elements", "expected"), WITH_VALUES.values(), ids=WITH_VALUES.keys())
def test_decode_reads_attributes_with_their_der_values(elements, expected):
    data = der.tlv(der.SEQUENCE, b"".join(elements))
    assert decode_csrattrs(data) == [CsrAttribute(oid, values) for oid, values in expected]


GOOD = encode_csrattrs([CHALLENGE_PASSWORD, ECDSA_SHA256])

BAD = {
    "fail/empty": b"",
    "fail/trailing-garbage": GOOD + b"\x00",
    "fail/two-sequences": GOOD + GOOD,
    "fail/set-not-sequence": der.tlv(der.SET, der.encode_oid(CHALLENGE_PASSWORD)),
    "fail/truncated": GOOD[:-1],
    "fail/length-beyond-data": b"\x30\x10" + GOOD[2:],
    "fail/integer-element": der.tlv(der.SEQUENCE, der.tlv(0x02, b"\x01")),
    "fail/attribute-without-set": der.tlv(
        der.SEQUENCE, der.tlv(der.SEQUENCE, der.encode_oid(CHALLENGE_PASSWORD))
    ),
    "fail/attribute-values-not-a-set": der.tlv(
        der.SEQUENCE,
        der.tlv(der.SEQUENCE, der.encode_oid(CHALLENGE_PASSWORD) + der.tlv(der.SEQUENCE, b"")),
    ),
    "fail/attribute-type-not-oid": der.tlv(
        der.SEQUENCE, der.tlv(der.SEQUENCE, UTF8_VALUE + der.tlv(der.SET, b""))
    ),
    "fail/empty-oid": der.tlv(der.SEQUENCE, der.tlv(der.OID, b"")),
    "fail/truncated-oid": der.tlv(der.SEQUENCE, der.tlv(der.OID, b"\x2a\x86")),
}


@pytest.mark.parametrize("data", BAD.values(), ids=BAD.keys())
def test_decode_rejects_what_is_not_csrattrs(data):
    with pytest.raises(DecodeError):
        decode_csrattrs(data)
