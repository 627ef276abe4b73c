"""Fingerprints and serials as operators type them, and chain checks in memory."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from estkit.pki.certs import (
    build_path,
    certs_to_pem,
    fingerprint,
    is_issued_by,
    is_valid_at,
    load_pem_certificates,
    normalize_fingerprint,
    parse_serial,
    serial_hex,
)
from estkit.pki.errors import DecodeError

HEX64 = "12DAEED3914FEA4CD8F15C02AA90D96D4CD895C250813E82FD46A3486A25BD77"
COLONS = ":".join(HEX64[i : i + 2] for i in range(0, 64, 2))


@pytest.mark.parametrize("role", ["leaf", "issuing", "root"], ids=lambda r: f"ok/{r}")
def test_fingerprint_is_what_openssl_prints(ca, openssl, role):
    cert = {"leaf": ca.leaf(), "issuing": ca.issuing, "root": ca.root}[role]
    printed = openssl(
        "x509", "-fingerprint", "-sha256", "-noout", stdin=cert.public_bytes(Encoding.PEM)
    )
    assert re.fullmatch(r"(?i:sha256) Fingerprint=(\S+)\s*", printed)
    assert fingerprint(cert) == printed.strip().split("=", 1)[1]
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", fingerprint(cert))


NORMALIZE_OK = {
    "ok/openssl-form": COLONS,
    "ok/no-colons": HEX64,
    "ok/lower-case": COLONS.lower(),
    "ok/lower-case-no-colons": HEX64.lower(),
    "ok/sha256-prefix": "sha256=" + HEX64.lower(),
    "ok/sha256-prefix-upper-with-colons": "SHA256=" + COLONS,
    "ok/surrounding-whitespace": f"  {COLONS}\n",
    "ok/space-separated-pairs": " ".join(COLONS.split(":")),
}


@pytest.mark.parametrize("text", NORMALIZE_OK.values(), ids=NORMALIZE_OK.keys())
def test_normalize_fingerprint_accepts_common_spellings(text):
    assert normalize_fingerprint(text) == COLONS


NORMALIZE_FAIL = {
    "fail/empty": "",
    "fail/63-digits": HEX64[:-1],
    "fail/65-digits": HEX64 + "0",
    "fail/sha1-length": HEX64[:40],
    "fail/sha512-length": HEX64 * 2,
    "fail/non-hex-digit": HEX64[:-1] + "G",
    "fail/other-prefix": "sha1=" + HEX64,
}


@pytest.mark.parametrize("text", NORMALIZE_FAIL.values(), ids=NORMALIZE_FAIL.keys())
def test_normalize_fingerprint_rejects_what_is_not_sha256(text):
    with pytest.raises(ValueError, match="SHA-256"):
        normalize_fingerprint(text)


def test_normalize_fingerprint_matches_fingerprint_of_the_certificate(ca):
    fp = fingerprint(ca.root)
    assert normalize_fingerprint(fp.replace(":", "").lower()) == fp


SERIALS = {
    "ok/one-digit-is-padded": (0x1, "01"),
    "ok/odd-length-is-padded": (0xABC, "0ABC"),
    "ok/even-length": (0xABCD, "ABCD"),
    "ok/high-bit-set-no-sign-byte": (0x80, "80"),
    "ok/seven-f": (0x7F, "7F"),
    "ok/20-octets": ((1 << 159) + 5, "80" + "00" * 18 + "05"),
}


@pytest.mark.parametrize(("serial", "text"), SERIALS.values(), ids=SERIALS.keys())
def test_serial_hex_is_upper_case_even_length_hex(serial, text):
    assert serial_hex(serial) == text


@pytest.mark.parametrize(
    "serial",
    [0x1, 0xABC, 0xABCD, 0x80, 0xFEDCBA987, None],
    ids=["ok/1", "ok/odd-abc", "ok/even-abcd", "ok/high-bit-80", "ok/odd-9-digits", "ok/random"],
)
def test_serial_hex_is_what_openssl_prints(ca, openssl, serial):
    cert = ca.leaf(serial=serial)
    printed = openssl("x509", "-serial", "-noout", stdin=cert.public_bytes(Encoding.PEM))
    assert printed.strip() == f"serial={serial_hex(cert.serial_number)}"


PARSE_OK = {
    "ok/openssl-form": ("0ABC", 0xABC),
    "ok/no-padding": ("abc", 0xABC),
    "ok/0x-prefix": ("0xABC", 0xABC),
    "ok/0x-prefix-upper": ("0XAbC", 0xABC),
    "ok/colons": ("0a:bc", 0xABC),
    "ok/surrounding-whitespace": ("  0ABC\n", 0xABC),
    "ok/random-size": ("5F" + "A1" * 15, int("5F" + "A1" * 15, 16)),
}


@pytest.mark.parametrize(("text", "serial"), PARSE_OK.values(), ids=PARSE_OK.keys())
def test_parse_serial_reads_hex_as_operators_type_it(text, serial):
    assert parse_serial(text) == serial


@pytest.mark.parametrize(
    "serial",
    [0x1, 0xABC, 0x80, (1 << 126) | 12345],
    ids=["ok/1", "ok/odd-abc", "ok/high-bit-80", "ok/127-bit"],
)
def test_parse_serial_reads_back_serial_hex(serial):
    assert parse_serial(serial_hex(serial)) == serial


PARSE_FAIL = {
    "fail/empty": "",
    "fail/0x-only": "0x",
    "fail/not-hex": "xyz",
    "fail/decimal-looking-with-g": "12g4",
    "fail/zero": "00",
    "fail/negative": "-1",
}


@pytest.mark.parametrize("text", PARSE_FAIL.values(), ids=PARSE_FAIL.keys())
def test_parse_serial_rejects_what_is_not_a_positive_hex_serial(text):
    with pytest.raises(ValueError, match="serial"):
        parse_serial(text)


def test_build_path_goes_leaf_to_intermediate_to_root(ca):
    leaf = ca.leaf()
    assert build_path(leaf, [ca.issuing], [ca.root]) == [leaf, ca.issuing, ca.root]


def test_build_path_ignores_unrelated_intermediates(ca, foreign_ca):
    leaf = ca.leaf()
    pool = [foreign_ca.issuing, ca.root, ca.issuing, foreign_ca.root]
    assert build_path(leaf, pool, [ca.root]) == [leaf, ca.issuing, ca.root]


def test_build_path_stops_at_an_intermediate_that_is_an_anchor(ca):
    leaf = ca.leaf()
    assert build_path(leaf, [], [ca.issuing]) == [leaf, ca.issuing]


def test_build_path_of_an_anchor_is_itself(ca):
    assert build_path(ca.root, [], [ca.root]) == [ca.root]


@pytest.mark.parametrize(
    "case",
    ["foreign-root", "foreign-root-same-names", "missing-intermediate", "no-anchor"],
    ids=lambda c: f"fail/{c}",
)
def test_build_path_returns_none_without_a_path_to_an_anchor(ca, foreign_ca, case):
    leaf = ca.leaf()
    intermediates, anchors = {
        "foreign-root": ([ca.issuing], [foreign_ca.root]),
        "foreign-root-same-names": ([foreign_ca.issuing], [foreign_ca.root]),
        "missing-intermediate": ([], [ca.root]),
        "no-anchor": ([ca.issuing], []),
    }[case]
    assert build_path(leaf, intermediates, anchors) is None


ISSUED_BY = {
    "ok/leaf-by-issuing": ("leaf", "issuing", True),
    "ok/issuing-by-root": ("issuing", "root", True),
    "ok/root-by-itself": ("root", "root", True),
    "fail/leaf-by-root": ("leaf", "root", False),
    "fail/issuing-by-leaf": ("issuing", "leaf", False),
    "fail/leaf-by-foreign-issuing-same-name": ("leaf", "foreign-issuing", False),
    "fail/root-by-foreign-root-same-name": ("root", "foreign-root", False),
}


@pytest.mark.parametrize(("cert", "issuer", "issued"), ISSUED_BY.values(), ids=ISSUED_BY.keys())
def test_is_issued_by_needs_the_issuer_key_and_name(ca, foreign_ca, cert, issuer, issued):
    roles = {
        "leaf": ca.leaf(),
        "issuing": ca.issuing,
        "root": ca.root,
        "foreign-issuing": foreign_ca.issuing,
        "foreign-root": foreign_ca.root,
    }
    assert is_issued_by(roles[cert], roles[issuer]) is issued


@pytest.mark.parametrize(
    ("offset", "valid"),
    [
        (dt.timedelta(0), True),
        (dt.timedelta(seconds=-1), False),
        (dt.timedelta(days=1), True),
        (None, True),
        (dt.timedelta(days=10_000), False),
    ],
    ids=[
        "ok/at-not-before",
        "fail/before-not-before",
        "ok/inside",
        "ok/at-not-after",
        "fail/after",
    ],
)
def test_is_valid_at_includes_both_ends(ca, offset, valid):
    leaf = ca.leaf()
    now = leaf.not_valid_after_utc if offset is None else leaf.not_valid_before_utc + offset
    assert is_valid_at(leaf, now) is valid


def test_load_pem_certificates_reads_back_certs_to_pem(ca):
    certs = [ca.leaf(), ca.issuing, ca.root]
    assert load_pem_certificates(certs_to_pem(certs)) == certs


@pytest.mark.parametrize(
    "data",
    [b"", b"not pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"],
    ids=["fail/empty", "fail/garbage", "fail/bad-body"],
)
def test_load_pem_certificates_rejects_what_is_not_a_pem_bundle(data):
    with pytest.raises(DecodeError):
        load_pem_certificates(data)
