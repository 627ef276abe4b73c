"""PKCS#10 requests: built on the device, parsed and checked on the server (DESIGN: Policy)."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from estkit.pki.csr import build_csr, parse_csr
from estkit.pki.errors import DecodeError, PolicyError
from estkit.pki.keys import public_keys_match


def name(*attrs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])


DEV1 = name((NameOID.COMMON_NAME, "dev-1"))
SANS = x509.SubjectAlternativeName(
    [
        x509.DNSName("dev-1.example"),
        x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
        x509.UniformResourceIdentifier("urn:dev:1"),
        x509.RFC822Name("dev-1@example.com"),
    ]
)


SHA256 = hashes.SHA256()


def csr_der(key, *, subject=DEV1, extensions=(), algorithm=SHA256) -> bytes:
    """A CSR made with cryptography directly, for what ``build_csr`` does not offer."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(key, algorithm).public_bytes(Encoding.DER)


@pytest.mark.parametrize(
    "key_type",
    ["ec-p256", "ec-p384", "rsa-2048", "rsa-3072"],
    ids=["ok/ec-p256", "ok/ec-p384", "ok/rsa-2048", "ok/rsa-3072"],
)
def test_parse_csr_accepts_what_build_csr_makes_for_each_key_type(key_of, key_type):
    key = key_of(key_type)
    request = parse_csr(build_csr(key, subject=DEV1, sans=SANS).public_bytes(Encoding.DER))
    assert request.key_type == key_type
    assert request.subject == DEV1
    assert request.common_name == "dev-1"
    assert request.sans == SANS
    assert public_keys_match(request.csr.public_key(), key.public_key())


def test_build_csr_keeps_the_string_encoding_of_the_subject(key_of):
    printable = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "dev-1", _type=_ASN1Type.PrintableString)]
    )
    csr = build_csr(key_of("ec-p256"), subject=printable)
    assert csr.subject.public_bytes() == printable.public_bytes()
    assert csr.subject.public_bytes() != DEV1.public_bytes()


@pytest.mark.parametrize(
    ("make_key", "algorithm"),
    [
        (lambda: ec.generate_private_key(ec.SECP521R1()), SHA256),
        (lambda: ec.generate_private_key(ec.SECP256K1()), SHA256),
        (lambda: ec.generate_private_key(ec.SECP224R1()), SHA256),
        (lambda: rsa.generate_private_key(65537, 1024), SHA256),  # noqa: S505 (refused)
        (lambda: ed25519.Ed25519PrivateKey.generate(), None),
    ],
    ids=["fail/ec-p521", "fail/ec-secp256k1", "fail/ec-p224", "fail/rsa-1024", "fail/ed25519"],
)
def test_parse_csr_refuses_key_types_outside_policy(make_key, algorithm):
    with pytest.raises(PolicyError):
        parse_csr(csr_der(make_key(), algorithm=algorithm))


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def tamper_signature(data: bytes, where: str) -> bytes:
    signature = x509.load_der_x509_csr(data).signature
    start = data.rindex(signature)
    index = {"first": start, "middle": start + len(signature) // 2, "last": len(data) - 1}
    return flip(data, index[where])


TAMPERED = [(k, w) for k in ("ec-p256", "rsa-2048") for w in ("first", "middle", "last")]


@pytest.mark.parametrize(
    ("key_type", "where"), TAMPERED, ids=[f"fail/{k}-{w}-signature-byte" for k, w in TAMPERED]
)
def test_parse_csr_refuses_a_tampered_signature(key_of, key_type, where):
    good = build_csr(key_of(key_type), subject=DEV1).public_bytes(Encoding.DER)
    parse_csr(good)
    with pytest.raises((PolicyError, DecodeError)):
        parse_csr(tamper_signature(good, where))


def test_parse_csr_refuses_a_subject_changed_after_signing(key_of):
    good = build_csr(key_of("ec-p256"), subject=DEV1).public_bytes(Encoding.DER)
    with pytest.raises(PolicyError, match="signature"):
        parse_csr(good.replace(b"dev-1", b"dev-2"))


@pytest.mark.parametrize(
    ("constraints", "critical", "refused"),
    [
        (x509.BasicConstraints(ca=True, path_length=None), True, True),
        (x509.BasicConstraints(ca=True, path_length=0), False, True),
        (x509.BasicConstraints(ca=False, path_length=None), True, False),
        (x509.BasicConstraints(ca=False, path_length=None), False, False),
    ],
    ids=["fail/ca-true-critical", "fail/ca-true-pathlen-0", "ok/ca-false-critical", "ok/ca-false"],
)
def test_parse_csr_refuses_a_request_for_a_ca_certificate(key_of, constraints, critical, refused):
    data = csr_der(key_of("ec-p256"), extensions=[(constraints, critical)])
    if refused:
        with pytest.raises(PolicyError, match="CA"):
            parse_csr(data)
    else:
        assert parse_csr(data).common_name == "dev-1"


def test_parse_csr_ignores_other_requested_extensions(key_of):
    usage = x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH])
    assert parse_csr(csr_der(key_of("ec-p256"), extensions=[(usage, False)])).key_type == "ec-p256"


@pytest.mark.parametrize(
    "sans",
    [
        None,
        x509.SubjectAlternativeName([x509.DNSName("dev-1.example")]),
        SANS,
        x509.SubjectAlternativeName(
            [x509.DirectoryName(name((NameOID.ORGANIZATION_NAME, "Example")))]
        ),
    ],
    ids=["ok/no-san", "ok/one-dns", "ok/dns-ip-uri-email", "ok/directory-name"],
)
def test_parse_csr_extracts_subject_alt_names(key_of, sans):
    request = parse_csr(
        build_csr(key_of("ec-p256"), subject=DEV1, sans=sans).public_bytes(Encoding.DER)
    )
    assert request.sans == sans


@pytest.mark.parametrize(
    ("subject", "cn"),
    [
        (DEV1, "dev-1"),
        (name((NameOID.ORGANIZATION_NAME, "Example"), (NameOID.COMMON_NAME, "dev-1")), "dev-1"),
        (name((NameOID.ORGANIZATION_NAME, "Example")), None),
        (x509.Name([]), None),
        (name((NameOID.COMMON_NAME, "dev-1"), (NameOID.COMMON_NAME, "dev-2")), None),
    ],
    ids=["ok/cn-only", "ok/cn-after-o", "ok/no-cn", "ok/empty-subject", "ok/two-cns-is-none"],
)
def test_parse_csr_extracts_the_single_common_name(key_of, subject, cn):
    request = parse_csr(build_csr(key_of("ec-p256"), subject=subject).public_bytes(Encoding.DER))
    assert request.common_name == cn


@pytest.mark.parametrize(
    "make",
    [
        lambda der: b"",
        lambda der: b"not a csr",
        lambda der: der[:-5],
        lambda der: der + b"\x00",
        lambda der: x509.load_der_x509_csr(der).public_bytes(Encoding.PEM),
    ],
    ids=["fail/empty", "fail/garbage", "fail/truncated", "fail/trailing-byte", "fail/pem-not-der"],
)
def test_parse_csr_raises_decode_error_for_what_is_not_der_pkcs10(key_of, make):
    good = build_csr(key_of("ec-p256"), subject=DEV1).public_bytes(Encoding.DER)
    with pytest.raises(DecodeError):
        parse_csr(make(good))


def test_parse_csr_raises_decode_error_for_a_certificate(ca):
    with pytest.raises(DecodeError):
        parse_csr(ca.root.public_bytes(Encoding.DER))


OPENSSL_EC_P256 = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256")


@pytest.mark.parametrize(
    ("newkey", "addext", "key_type", "sans"),
    [
        (OPENSSL_EC_P256, (), "ec-p256", None),
        (
            OPENSSL_EC_P256,
            ("-addext", "subjectAltName=DNS:dev-1.example,IP:192.0.2.7"),
            "ec-p256",
            x509.SubjectAlternativeName(
                [x509.DNSName("dev-1.example"), x509.IPAddress(ipaddress.ip_address("192.0.2.7"))]
            ),
        ),
        (("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"), (), "ec-p384", None),
        (("-newkey", "rsa:2048"), (), "rsa-2048", None),
        (OPENSSL_EC_P256, ("-addext", "basicConstraints=critical,CA:FALSE"), "ec-p256", None),
    ],
    ids=["ok/ec-p256", "ok/ec-p256-with-san", "ok/ec-p384", "ok/rsa-2048", "ok/ca-false"],
)
def test_parse_csr_accepts_a_csr_made_by_openssl_req(
    openssl, tmp_path, newkey, addext, key_type, sans
):
    out = tmp_path / "csr.der"
    openssl(
        "req", "-new", *newkey, "-nodes", "-keyout", str(tmp_path / "key.pem"),
        "-subj", "/O=Example/CN=dev-1", *addext, "-outform", "DER", "-out", str(out),
    )  # fmt: skip
    request = parse_csr(out.read_bytes())
    assert request.key_type == key_type
    assert request.common_name == "dev-1"
    assert request.sans == sans


@pytest.mark.parametrize(
    ("newkey", "addext"),
    [
        (("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"), ()),
        (OPENSSL_EC_P256, ("-addext", "basicConstraints=critical,CA:TRUE")),
    ],
    ids=["fail/ec-p521", "fail/ca-true"],
)
def test_parse_csr_refuses_an_openssl_req_csr_outside_policy(openssl, tmp_path, newkey, addext):
    out = tmp_path / "csr.der"
    openssl(
        "req", "-new", *newkey, "-nodes", "-keyout", str(tmp_path / "key.pem"),
        "-subj", "/CN=dev-1", *addext, "-outform", "DER", "-out", str(out),
    )  # fmt: skip
    with pytest.raises(PolicyError):
        parse_csr(out.read_bytes())
