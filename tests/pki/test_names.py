"""Name comparison for re-enrollment (RFC 7030 4.2.2, RFC 5280 7.1)."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from estkit.pki.names import common_name, names_equal, sans_equal, subject_alt_names

CN, ORG, OU = NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME


def attr(oid: x509.ObjectIdentifier, value: str, kind: _ASN1Type | None = None):
    if kind is None:
        return x509.NameAttribute(oid, value)
    return x509.NameAttribute(oid, value, _type=kind)


def name(*attrs: x509.NameAttribute) -> x509.Name:
    return x509.Name(list(attrs))


PRINTABLE, UTF8 = _ASN1Type.PrintableString, _ASN1Type.UTF8String

NAMES_EQUAL = {
    "ok/byte-equal": (name(attr(CN, "dev-1")), name(attr(CN, "dev-1")), True),
    "ok/printable-vs-utf8": (
        name(attr(CN, "dev-1", PRINTABLE)),
        name(attr(CN, "dev-1", UTF8)),
        True,
    ),
    "ok/printable-vs-utf8-in-second-rdn": (
        name(attr(ORG, "Example", PRINTABLE), attr(CN, "dev-1")),
        name(attr(ORG, "Example", UTF8), attr(CN, "dev-1")),
        True,
    ),
    "ok/case-differs": (
        name(attr(CN, "Dev-1"), attr(ORG, "EXAMPLE")),
        name(attr(CN, "dev-1"), attr(ORG, "example")),
        True,
    ),
    "ok/inner-whitespace-collapsed": (name(attr(CN, "dev  1")), name(attr(CN, "dev 1")), True),
    "ok/surrounding-whitespace-ignored": (name(attr(CN, " dev-1 ")), name(attr(CN, "dev-1")), True),
    "ok/both-empty": (name(), name(), True),
    "ok/multi-valued-rdn-any-order": (
        x509.Name([x509.RelativeDistinguishedName([attr(CN, "dev-1"), attr(OU, "iot")])]),
        x509.Name([x509.RelativeDistinguishedName([attr(OU, "iot"), attr(CN, "dev-1")])]),
        True,
    ),
    "fail/different-value": (name(attr(CN, "dev-1")), name(attr(CN, "dev-2")), False),
    "fail/inner-space-removed": (name(attr(CN, "dev 1")), name(attr(CN, "dev1")), False),
    "fail/different-order": (
        name(attr(CN, "dev-1"), attr(ORG, "Example")),
        name(attr(ORG, "Example"), attr(CN, "dev-1")),
        False,
    ),
    "fail/extra-attribute": (
        name(attr(CN, "dev-1")),
        name(attr(CN, "dev-1"), attr(ORG, "Example")),
        False,
    ),
    "fail/other-attribute-type": (name(attr(CN, "dev-1")), name(attr(ORG, "dev-1")), False),
    "fail/empty-vs-cn": (name(), name(attr(CN, "dev-1")), False),
    "fail/multi-valued-rdn-vs-two-rdns": (
        x509.Name([x509.RelativeDistinguishedName([attr(CN, "dev-1"), attr(OU, "iot")])]),
        name(attr(CN, "dev-1"), attr(OU, "iot")),
        False,
    ),
}


@pytest.mark.parametrize(("a", "b", "equal"), NAMES_EQUAL.values(), ids=NAMES_EQUAL.keys())
def test_names_equal_compares_as_rfc5280_section_7_1(a, b, equal):
    assert names_equal(a, b) is equal
    assert names_equal(b, a) is equal


def test_printable_and_utf8_names_differ_in_bytes_but_compare_equal():
    printable, utf8 = name(attr(CN, "dev-1", PRINTABLE)), name(attr(CN, "dev-1", UTF8))
    assert printable.public_bytes() != utf8.public_bytes()
    assert names_equal(printable, utf8)


COMMON_NAMES = {
    "ok/none": (name(attr(ORG, "Example")), None),
    "ok/empty-name": (name(), None),
    "ok/one": (name(attr(CN, "dev-1")), "dev-1"),
    "ok/one-among-others": (
        name(attr(ORG, "Example"), attr(CN, "dev-1"), attr(OU, "iot")),
        "dev-1",
    ),
    "ok/several-is-none": (name(attr(CN, "dev-1"), attr(CN, "dev-2")), None),
}


@pytest.mark.parametrize(("subject", "expected"), COMMON_NAMES.values(), ids=COMMON_NAMES.keys())
def test_common_name_is_the_single_cn_or_none(subject, expected):
    assert common_name(subject) == expected


def san(*names: x509.GeneralName) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName(list(names))


DNS, IP, EMAIL, URI = x509.DNSName, x509.IPAddress, x509.RFC822Name, x509.UniformResourceIdentifier
IP7 = ipaddress.ip_address("192.0.2.7")

SANS_EQUAL = {
    "ok/both-absent": (None, None, True),
    "ok/absent-vs-empty": (None, san(), True),
    "ok/both-empty": (san(), san(), True),
    "ok/same-dns": (san(DNS("dev-1.example")), san(DNS("dev-1.example")), True),
    "ok/dns-case-insensitive": (san(DNS("Dev-1.EXAMPLE")), san(DNS("dev-1.example")), True),
    "ok/email-case-insensitive": (
        san(EMAIL("Dev@Example.com")),
        san(EMAIL("dev@example.com")),
        True,
    ),
    "ok/same-ip": (san(IP(IP7)), san(IP(IP7)), True),
    "ok/directory-name-printable-vs-utf8": (
        san(x509.DirectoryName(name(attr(CN, "dev-1", PRINTABLE)))),
        san(x509.DirectoryName(name(attr(CN, "dev-1", UTF8)))),
        True,
    ),
    "ok/several-same-order": (
        san(DNS("a.example"), IP(IP7), URI("urn:dev:1")),
        san(DNS("a.example"), IP(IP7), URI("urn:dev:1")),
        True,
    ),
    "fail/absent-vs-dns": (None, san(DNS("dev-1.example")), False),
    "fail/empty-vs-dns": (san(), san(DNS("dev-1.example")), False),
    "fail/different-dns": (san(DNS("dev-1.example")), san(DNS("dev-2.example")), False),
    "fail/order-matters": (
        san(DNS("a.example"), DNS("b.example")),
        san(DNS("b.example"), DNS("a.example")),
        False,
    ),
    "fail/extra-name": (san(DNS("a.example")), san(DNS("a.example"), IP(IP7)), False),
    "fail/dns-vs-uri-same-text": (san(DNS("dev-1.example")), san(URI("dev-1.example")), False),
    "fail/uri-case-sensitive": (san(URI("urn:dev:A")), san(URI("urn:dev:a")), False),
}


@pytest.mark.parametrize(("a", "b", "equal"), SANS_EQUAL.values(), ids=SANS_EQUAL.keys())
def test_sans_equal_compares_names_in_order(a, b, equal):
    assert sans_equal(a, b) is equal
    assert sans_equal(b, a) is equal


@pytest.mark.parametrize(
    "sans",
    [None, san(DNS("dev-1.example"), IP(IP7))],
    ids=["ok/absent", "ok/present"],
)
def test_subject_alt_names_reads_the_extension_of_a_csr(key_of, sans):
    builder = x509.CertificateSigningRequestBuilder().subject_name(name(attr(CN, "dev-1")))
    if sans is not None:
        builder = builder.add_extension(sans, critical=False)
    csr = builder.sign(key_of("ec-p256"), hashes.SHA256())
    assert subject_alt_names(csr.extensions) == sans
