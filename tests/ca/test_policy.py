"""The policy, pure: every refusal code it gives, table-driven, without store or server."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from caenv import NOW, OPERATIONAL, Cas, label, make_csr, refused
from estkit.ca import policy
from estkit.ca.errors import Code
from estkit.ca.policy import Principal
from estkit.pki.keys import PrivateKey, generate_key
from estkit.pki.profiles import issue_leaf
from estkit.store import CertStatus, DeviceStatus, PresentedCertificate
from testpki import cn_name


def leaf(
    cas: Cas,
    ca: str = "devices",
    *,
    cn: str | None = "dev-1",
    sans: list[x509.GeneralName] | None = None,
    subject: x509.Name | None = None,
    issued: dt.datetime = NOW - dt.timedelta(days=1),
) -> x509.Certificate:
    issuer = getattr(cas, ca)
    name = subject if subject is not None else (cn_name(cn) if cn else x509.Name([]))
    return issue_leaf(
        profile=OPERATIONAL,
        public_key=generate_key("ec-p256").public_key(),
        subject=name,
        sans=x509.SubjectAlternativeName(sans) if sans else None,
        issuer=issuer.cert,
        issuer_key=issuer.key,
        now=issued,
    )


def record(
    cert: x509.Certificate,
    *,
    ca: str = "devices",
    device_id: str = "dev-1",
    status: CertStatus = CertStatus.VALID,
    device_status: DeviceStatus | None = DeviceStatus.ACTIVE,
) -> PresentedCertificate:
    return PresentedCertificate(
        serial="01",
        device_id=device_id,
        ca=ca,
        status=status,
        der=cert.public_bytes(Encoding.DER),
        device_status=device_status,
    )


CLIENT_CAS = frozenset({"bootstrap", "devices"})


# -- the request ---------------------------------------------------------------------------


def test_parse_request_refuses_what_is_not_a_csr() -> None:
    refused(Code.BAD_CSR, lambda: policy.parse_request(b"\x30\x03\x02\x01\x00"))


def test_parse_request_refuses_a_csr_whose_signature_does_not_verify(key: PrivateKey) -> None:
    der = bytearray(make_csr(key))
    der[-3] ^= 0xFF  # inside the signature
    refused(Code.BAD_CSR, lambda: policy.parse_request(bytes(der)))


def test_parse_request_refuses_a_csr_asking_for_a_ca(key: PrivateKey) -> None:
    refused(Code.BAD_CSR, lambda: policy.parse_request(make_csr(key, ca=True)))


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: ec.generate_private_key(ec.SECP521R1()),
        lambda: rsa.generate_private_key(65537, 1024),  # noqa: S505 - refused, the point
    ],
    ids=["fail/p521", "fail/rsa1024"],
)
def test_parse_request_refuses_keys_outside_policy(make_key: Callable[[], PrivateKey]) -> None:
    refused(Code.KEY_NOT_PERMITTED, lambda: policy.parse_request(make_csr(make_key())))


@pytest.mark.parametrize(
    "device_id",
    ["c:d", "\uff44\uff45\uff56-a", "dév-1", "", "a" * 65, "a b", "x/y", "..", "dev#1"],
    ids=["colon", "fullwidth", "accent", "empty", "65-chars", "space", "slash", "dotdot", "hash"],
)
def test_one_device_id_rule_refuses(device_id: str) -> None:
    refused(Code.BAD_REQUEST, lambda: policy.check_device_id(device_id))


@pytest.mark.parametrize("device_id", ["dev-1", "a" * 64, "Dev_1.x", "o'k(1)=@$!,*%?"])
def test_one_device_id_rule_accepts_azure_device_ids(device_id: str) -> None:
    policy.check_device_id(device_id)


# -- who is asking ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (None, Code.NOT_REGISTERED),
        (DeviceStatus.DISABLED, Code.DISABLED),
        (DeviceStatus.DECOMMISSIONED, Code.DECOMMISSIONED),
    ],
    ids=["fail/not-registered", "fail/disabled", "fail/decommissioned"],
)
def test_device_status_refusals(status: DeviceStatus | None, code: Code) -> None:
    refused(code, lambda: policy.check_device_status("dev-1", status))


def _client_cases(cas: Cas) -> list[tuple[str, x509.Certificate, object, Code | None]]:
    good = leaf(cas)
    other_der = record(leaf(cas))
    return [
        ("ok/operational", good, record(good), None),
        ("fail/no-cn", leaf(cas, cn=None), "record", Code.UNKNOWN_CERTIFICATE),
        ("fail/expired", leaf(cas, issued=NOW - dt.timedelta(days=40)), "record", Code.EXPIRED),
        (
            "fail/not-yet-valid",
            leaf(cas, issued=NOW + dt.timedelta(days=1)),
            "record",
            Code.NOT_YET_VALID,
        ),
        ("fail/no-record", good, None, Code.UNKNOWN_CERTIFICATE),
        ("fail/other-der", good, other_der, Code.UNKNOWN_CERTIFICATE),
        ("fail/wrong-ca", leaf(cas, "other"), ("ca", "other"), Code.WRONG_CA),
        ("fail/other-device", good, ("device_id", "dev-2"), Code.UNKNOWN_CERTIFICATE),
        ("fail/not-registered", good, ("device_status", None), Code.NOT_REGISTERED),
        ("fail/disabled", good, ("device_status", DeviceStatus.DISABLED), Code.DISABLED),
        (
            "fail/decommissioned",
            good,
            ("device_status", DeviceStatus.DECOMMISSIONED),
            Code.DECOMMISSIONED,
        ),
        ("fail/revoked", good, ("status", CertStatus.REVOKED), Code.REVOKED),
    ]


CLIENT_IDS = [
    "ok/operational",
    "fail/no-cn",
    "fail/expired",
    "fail/not-yet-valid",
    "fail/no-record",
    "fail/other-der",
    "fail/wrong-ca",
    "fail/other-device",
    "fail/not-registered",
    "fail/disabled",
    "fail/decommissioned",
    "fail/revoked",
]


@pytest.mark.parametrize("case", CLIENT_IDS)
def test_client_certificate_decision(cas: Cas, case: str) -> None:
    cases = {c[0]: c[1:] for c in _client_cases(cas)}
    cert, rec, code = cases[case]
    if rec == "record":
        rec = record(cert)
    elif isinstance(rec, tuple):
        rec = replace(record(cert), **{rec[0]: rec[1]})
    assert rec is None or isinstance(rec, PresentedCertificate)
    decide = lambda: policy.client_certificate_device(  # noqa: E731
        cert, rec, client_cas=CLIENT_CAS, now=NOW
    )
    if code is None:
        assert decide() == "dev-1"
    else:
        refused(code, decide)


def test_a_decommissioned_device_hears_decommissioned_before_revoked(cas: Cas) -> None:
    cert = leaf(cas)
    rec = replace(
        record(cert), status=CertStatus.REVOKED, device_status=DeviceStatus.DECOMMISSIONED
    )
    refused(
        Code.DECOMMISSIONED,
        lambda: policy.client_certificate_device(cert, rec, client_cas=CLIENT_CAS, now=NOW),
    )


# -- what is asked for -------------------------------------------------------------------


def bootstrap_principal(cas: Cas) -> Principal:
    return Principal(
        device_id="dev-1", actor="cert:01", cert=leaf(cas, "bootstrap"), cert_ca="bootstrap"
    )


def test_enroll_builds_the_subject_never_copies_it(cas: Cas, key: PrivateKey) -> None:
    extra = [
        (NameOID.ORGANIZATION_NAME, "x"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "admins"),
        (NameOID.SERIAL_NUMBER, "dev-b"),
    ]
    request = policy.parse_request(make_csr(key, extra=extra))
    grant = policy.decide_enroll(label(), request, bootstrap_principal(cas))
    assert grant.subject == cn_name("dev-1")
    profiled = replace(OPERATIONAL, subject=(("O", "Contoso"), ("OU", "sensors")))
    grant = policy.decide_enroll(label(profile=profiled), request, bootstrap_principal(cas))
    assert grant.subject.rfc4514_string() == "OU=sensors,O=Contoso,CN=dev-1"


def test_enroll_refuses_a_csr_for_another_device(cas: Cas, key: PrivateKey) -> None:
    request = policy.parse_request(make_csr(key, "dev-2"))
    refused(
        Code.NAME_MISMATCH, lambda: policy.decide_enroll(label(), request, bootstrap_principal(cas))
    )


def test_enroll_refuses_a_certificate_of_a_ca_not_on_the_label(cas: Cas, key: PrivateKey) -> None:
    who = Principal(device_id="dev-1", actor="cert:02", cert=leaf(cas, "other"), cert_ca="other")
    request = policy.parse_request(make_csr(key))
    refused(Code.WRONG_CA, lambda: policy.decide_enroll(label(), request, who))


DNS = x509.DNSName


@pytest.mark.parametrize(
    ("sans", "changes"),
    [
        ([DNS("localhost")], {}),
        ([DNS("*.example.com")], {}),
        ([DNS("good.com\x00.evil")], {}),
        ([DNS("-bad.example.com")], {}),
        ([DNS("xn--zz.example.com")], {}),
        ([DNS("xn--ab.example.com")], {}),  # decodes to a C1 control character
        ([DNS("xn--1ug.example.com")], {}),  # a zero-width non-joiner
        ([DNS("xn--a-ecp.example.com")], {}),  # holds an ideographic full stop
        ([DNS("xn--ls8h.example.com")], {}),  # an emoji (IDNA2008 disallows symbols)
        ([DNS("1.2.3.4")], {}),
        ([DNS(f"d{i}.example.com") for i in range(11)], {}),
        ([DNS(f"d{i}.example.com") for i in range(3)], {"max_sans": 2}),
        ([x509.RFC822Name("a@example.com")], {}),
        ([x509.IPAddress(ipaddress.ip_address("192.0.2.1"))], {}),
        ([x509.UniformResourceIdentifier("no scheme here")], {}),
    ],
    ids=[
        "single-label",
        "wildcard-not-permitted",
        "nul",
        "leading-hyphen",
        "bad-a-label",
        "a-label-control",
        "a-label-zwnj",
        "a-label-separator",
        "a-label-symbol",
        "ip-as-dns",
        "over-default-cap",
        "over-label-cap",
        "email-type-not-permitted",
        "ip-type-not-permitted",
        "uri-not-absolute",
    ],
)
def test_enroll_refuses_sans_outside_policy(
    cas: Cas, key: PrivateKey, sans: list[x509.GeneralName], changes: dict[str, object]
) -> None:
    request = policy.parse_request(make_csr(key, sans=sans))
    refused(
        Code.SAN_NOT_PERMITTED,
        lambda: policy.decide_enroll(label(**changes), request, bootstrap_principal(cas)),
    )


@pytest.mark.parametrize(
    ("sans", "changes"),
    [
        ([DNS("dev-1.example.com"), DNS("xn--bcher-kva.example")], {}),
        ([DNS("*.dev-1.example.com")], {"dns_wildcards": True}),
        ([DNS(f"d{i}.example.com") for i in range(10)], {}),
        ([x509.UniformResourceIdentifier("urn:dev:1")], {}),
        (
            [x509.IPAddress(ipaddress.ip_address("192.0.2.1"))],
            {"permitted_san_types": frozenset({"ip"})},
        ),
    ],
    ids=["ok/dns-and-a-label", "ok/wildcard-permitted", "ok/ten", "ok/uri", "ok/ip-permitted"],
)
def test_enroll_keeps_sans_within_policy(
    cas: Cas, key: PrivateKey, sans: list[x509.GeneralName], changes: dict[str, object]
) -> None:
    request = policy.parse_request(make_csr(key, sans=sans))
    grant = policy.decide_enroll(label(**changes), request, bootstrap_principal(cas))
    assert grant.sans is not None and list(grant.sans) == sans


def operational_principal(cas: Cas, sans: list[x509.GeneralName] | None = None) -> Principal:
    return Principal(
        device_id="dev-1",
        actor="cert:03",
        cert=leaf(cas, sans=sans),
        cert_ca="devices",
        cert_serial="03",
    )


@pytest.mark.parametrize("operation", ["enroll", "reenroll"])
@pytest.mark.parametrize(
    ("csr_sans", "extra"),
    [
        ([DNS("dev-1.example.com"), DNS("new.example.com")], []),
        ([], []),
        ([DNS("dev-1.example.com")], [(NameOID.ORGANIZATIONAL_UNIT_NAME, "admins")]),
    ],
    ids=["fail/new-san", "fail/dropped-san", "fail/new-subject-attribute"],
)
def test_an_operational_certificate_renews_only_its_own_names(
    cas: Cas,
    key: PrivateKey,
    operation: str,
    csr_sans: list[x509.GeneralName],
    extra: list[tuple[x509.ObjectIdentifier, str]],
) -> None:
    """simpleenroll with an operational certificate follows simplereenroll's rule."""
    who = operational_principal(cas, [DNS("dev-1.example.com")])
    request = policy.parse_request(make_csr(key, sans=csr_sans, extra=extra))
    decide = policy.decide_enroll if operation == "enroll" else policy.decide_reenroll
    refused(Code.SUBJECT_CHANGED, lambda: decide(label(), request, who))


@pytest.mark.parametrize("operation", ["enroll", "reenroll"])
def test_an_operational_certificate_renews_with_a_new_key(
    cas: Cas, key: PrivateKey, operation: str
) -> None:
    who = operational_principal(cas, [DNS("dev-1.example.com")])
    request = policy.parse_request(make_csr(key, sans=[DNS("DEV-1.example.com")]))
    decide = policy.decide_enroll if operation == "enroll" else policy.decide_reenroll
    grant = decide(label(), request, who)
    assert grant.replaces == "03"
    assert grant.subject == cn_name("dev-1")
    assert grant.sans is not None and list(grant.sans) == [DNS("dev-1.example.com")]


def test_reenroll_needs_a_client_certificate(key: PrivateKey) -> None:
    who = Principal(device_id="dev-1", actor="secret:dev-1", secret_id=1)
    request = policy.parse_request(make_csr(key))
    refused(Code.CERTIFICATE_REQUIRED, lambda: policy.decide_reenroll(label(), request, who))


def test_reenroll_refuses_a_bootstrap_certificate(cas: Cas, key: PrivateKey) -> None:
    request = policy.parse_request(make_csr(key))
    refused(
        Code.WRONG_CA, lambda: policy.decide_reenroll(label(), request, bootstrap_principal(cas))
    )


@pytest.mark.parametrize(
    ("device_id", "status", "dns_names", "code"),
    [
        ("dev-2", None, None, Code.NAME_MISMATCH),
        ("dev-1", DeviceStatus.DISABLED, None, Code.DISABLED),
        ("dev-1", DeviceStatus.DECOMMISSIONED, None, Code.DECOMMISSIONED),
        ("dev-1", None, ["localhost"], Code.SAN_NOT_PERMITTED),
        ("dev-1", None, [f"d{i}.example.com" for i in range(11)], Code.SAN_NOT_PERMITTED),
        ("c:d", None, None, Code.BAD_REQUEST),
    ],
    ids=["name-mismatch", "disabled", "decommissioned", "bad-dns", "too-many", "bad-id"],
)
def test_provision_refusals(
    key: PrivateKey,
    device_id: str,
    status: DeviceStatus | None,
    dns_names: list[str] | None,
    code: Code,
) -> None:
    request = policy.parse_request(make_csr(key))
    refused(
        code,
        lambda: policy.decide_provision(
            label(), request, device_id=device_id, device_status=status, dns_names=dns_names
        ),
    )


def test_provision_of_a_new_device_with_dns_names(key: PrivateKey) -> None:
    request = policy.parse_request(make_csr(key))
    grant = policy.decide_provision(
        label(), request, device_id="dev-1", device_status=None, dns_names=["dev-1.example.com"]
    )
    assert grant.sans is not None and list(grant.sans) == [DNS("dev-1.example.com")]


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    length = (
        bytes([n])
        if n < 128
        else bytes([0x80 | ((n.bit_length() + 7) // 8)])
        + n.to_bytes((n.bit_length() + 7) // 8, "big")
    )
    return bytes([tag]) + length + content


def _csr_with_two_valued_attribute(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A validly signed CSR whose unstructuredName attribute holds two values."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import PublicFormat

    values = _der(0x0C, b"abc") + _der(0x0C, b"abd")
    attribute = _der(0x30, _der(0x06, bytes.fromhex("2a864886f70d010902")) + _der(0x31, values))
    info = _der(
        0x30,
        _der(0x02, b"\x00")
        + cn_name("dev-1").public_bytes()
        + key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        + _der(0xA0, attribute),
    )
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    algorithm = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d040302")))
    return _der(0x30, info + algorithm + _der(0x03, b"\x00" + signature))


def test_parse_request_refuses_a_csr_whose_attributes_cannot_be_read() -> None:
    """``cryptography`` cannot read a multi-valued attribute: a bad CSR at once, not a 500
    when channel binding or serverkeygen reads the attributes later."""
    key = ec.generate_private_key(ec.SECP256R1())
    der = _csr_with_two_valued_attribute(key)
    assert x509.load_der_x509_csr(der).is_signature_valid
    refused(Code.BAD_CSR, lambda: policy.parse_request(der))


def test_serverkeygen_refuses_a_request_for_symmetric_key_encryption(key: PrivateKey) -> None:
    """RFC 7030 4.4.1.1's DecryptKeyIdentifier cannot be honoured: refused, never the key
    sent unencrypted to a client that asked for it encrypted."""
    from cryptography.hazmat.primitives import hashes

    from estkit.pki.serverkeygen import SYMMETRIC_DECRYPT_KEY_IDENTIFIER, decrypt_key_identifier

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(cn_name("dev-1"))
        .add_attribute(SYMMETRIC_DECRYPT_KEY_IDENTIFIER, b"key-1")
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(ValueError, match="DecryptKeyIdentifier"):
        decrypt_key_identifier(csr)
