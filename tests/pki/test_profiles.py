"""Certificate profiles: the profile, not the CSR, decides what a certificate carries."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID

from estkit.pki.certs import certs_to_pem
from estkit.pki.crl import build_crl
from estkit.pki.profiles import BACKDATE, Kind, Profile, issue_ca, issue_leaf, random_serial
from testpki import cn_name

DAY = dt.timedelta(days=1)
OPERATIONAL = Profile(name="operational", kind=Kind.OPERATIONAL, validity=30 * DAY)


def ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


def has_ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> bool:
    try:
        ext(cert, kind)
    except x509.ExtensionNotFound:
        return False
    return True


@pytest.fixture(scope="module")
def issue(ca, now, key_of):
    """issue_leaf from the session's issuing CA; keyword arguments override the defaults."""

    def run(**kwargs):
        args = {
            "profile": OPERATIONAL,
            "public_key": kwargs.pop("key", None) or key_of("ec-p256").public_key(),
            "subject": cn_name("dev-1"),
            "sans": None,
            "issuer": ca.issuing,
            "issuer_key": ca.issuing_key,
            "now": now,
        }
        return issue_leaf(**(args | kwargs))

    return run


@pytest.mark.parametrize(
    ("key_type", "key_encipherment"),
    [("ec-p256", False), ("ec-p384", False), ("rsa-2048", True)],
    ids=["ok/ec-p256-signature-only", "ok/ec-p384-signature-only", "ok/rsa-adds-encipherment"],
)
def test_operational_key_usage_is_digital_signature_plus_encipherment_for_rsa(
    issue, key_of, key_type, key_encipherment
):
    usage = ext(issue(key=key_of(key_type).public_key()), x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert usage.value.key_encipherment is key_encipherment
    assert not any(
        (
            usage.value.content_commitment,
            usage.value.data_encipherment,
            usage.value.key_agreement,
            usage.value.key_cert_sign,
            usage.value.crl_sign,
        )
    )


@pytest.mark.parametrize(
    ("kind", "eku"),
    [
        (Kind.OPERATIONAL, ExtendedKeyUsageOID.CLIENT_AUTH),
        (Kind.BOOTSTRAP, ExtendedKeyUsageOID.CLIENT_AUTH),
        (Kind.TLS_SERVER, ExtendedKeyUsageOID.SERVER_AUTH),
    ],
    ids=["ok/operational-client-auth", "ok/bootstrap-client-auth", "ok/tls-server-server-auth"],
)
def test_extended_key_usage_follows_the_profile_kind(issue, kind, eku):
    cert = issue(profile=Profile(name=kind.value, kind=kind, validity=30 * DAY))
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [eku]


def test_leaf_is_not_a_ca_and_says_so_critically(issue):
    constraints = ext(issue(), x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=False, path_length=None)


def test_leaf_key_identifiers_chain_to_the_issuer(issue, ca, key_of):
    key = key_of("ec-p256").public_key()
    cert = issue(key=key)
    assert ext(cert, x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(key)
    )
    issuer_ski = ext(ca.issuing, x509.SubjectKeyIdentifier).value
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == issuer_ski.digest


def test_leaf_is_signed_by_the_issuer_with_its_subject_and_key(issue, ca, key_of):
    key = key_of("ec-p256").public_key()
    cert = issue(key=key, subject=cn_name("dev-42"))
    cert.verify_directly_issued_by(ca.issuing)
    assert cert.subject == cn_name("dev-42")
    assert cert.issuer == ca.issuing.subject
    assert cert.public_key() == key


SANS = {
    "ok/none": (None, None),
    "ok/empty-dropped": (x509.SubjectAlternativeName([]), None),
    "ok/copied": (
        x509.SubjectAlternativeName([x509.DNSName("dev-1.example")]),
        x509.SubjectAlternativeName([x509.DNSName("dev-1.example")]),
    ),
}


@pytest.mark.parametrize(("sans", "expected"), SANS.values(), ids=SANS.keys())
def test_subject_alt_name_is_copied_only_when_given(issue, sans, expected):
    cert = issue(sans=sans)
    if expected is None:
        assert not has_ext(cert, x509.SubjectAlternativeName)
    else:
        san = ext(cert, x509.SubjectAlternativeName)
        assert san.value == expected
        assert not san.critical


@pytest.mark.parametrize(
    "urls",
    [(), ("http://crl.example/issuing.crl",), ("http://a.example/c.crl", "http://b.example/c.crl")],
    ids=["ok/none", "ok/one", "ok/two-in-order"],
)
def test_crl_distribution_points_follow_crl_urls(issue, urls):
    cert = issue(crl_urls=urls)
    if not urls:
        assert not has_ext(cert, x509.CRLDistributionPoints)
        return
    points = ext(cert, x509.CRLDistributionPoints).value
    assert [p.full_name[0].value for p in points] == list(urls)


VALIDITY = {
    # (profile validity, not_after relative to now or None, expected end relative to now)
    "ok/profile-validity": (30 * DAY, None, 30 * DAY),
    "ok/not-after-shortens": (30 * DAY, 7 * DAY, 7 * DAY),
    "ok/not-after-cannot-lengthen": (30 * DAY, 90 * DAY, 30 * DAY),
}


@pytest.mark.parametrize(("validity", "not_after", "end"), VALIDITY.values(), ids=VALIDITY.keys())
def test_validity_is_the_profiles_unless_not_after_shortens_it(
    issue, now, validity, not_after, end
):
    profile = Profile(name="p", kind=Kind.OPERATIONAL, validity=validity)
    cert = issue(profile=profile, not_after=None if not_after is None else now + not_after)
    assert cert.not_valid_after_utc == now + end
    assert cert.not_valid_before_utc == now - BACKDATE


def test_short_profiles_backdate_a_tenth_of_their_validity(issue, now):
    cert = issue(
        profile=Profile(name="short", kind=Kind.OPERATIONAL, validity=dt.timedelta(minutes=10))
    )
    assert cert.not_valid_before_utc == now - dt.timedelta(minutes=1)


@pytest.mark.parametrize(
    "profile_validity",
    [10 * DAY, 400 * DAY],
    ids=["ok/inside-issuer-lifetime", "ok/clamped-to-issuer-not-after"],
)
def test_leaf_never_outlives_its_issuer(ca, key_of, now, profile_validity):
    key = key_of("ec-p256")
    short_ca = issue_ca(
        subject=cn_name("Short-lived CA"),
        public_key=key.public_key(),
        issuer=ca.root,
        issuer_key=ca.root_key,
        validity=20 * DAY,
        now=now,
        path_length=0,
    )
    leaf = issue_leaf(
        profile=Profile(name="p", kind=Kind.OPERATIONAL, validity=profile_validity),
        public_key=key.public_key(),
        subject=cn_name("dev-1"),
        sans=None,
        issuer=short_ca,
        issuer_key=key,
        now=now,
    )
    assert leaf.not_valid_after_utc <= short_ca.not_valid_after_utc
    assert leaf.not_valid_after_utc == min(now + profile_validity, short_ca.not_valid_after_utc)


def test_serials_are_positive_at_most_20_octets_and_differ(issue):
    serials = [issue().serial_number for _ in range(20)]
    assert len(set(serials)) == len(serials)
    for serial in serials:
        assert serial > 0
        assert (serial.bit_length() + 8) // 8 <= 20  # DER INTEGER octets, sign bit included


def test_random_serial_has_a_fixed_length_and_varies():
    serials = {random_serial() for _ in range(200)}
    assert len(serials) == 200
    assert {s.bit_length() for s in serials} == {127}


def test_a_given_serial_is_used(issue):
    assert issue(serial=0xABC).serial_number == 0xABC


def test_signature_hash_follows_the_issuer_key(issue, ca, key_of, now):
    assert isinstance(issue().signature_hash_algorithm, hashes.SHA256)  # P-256 issuing CA
    assert isinstance(ca.issuing.signature_hash_algorithm, hashes.SHA384)  # P-384 root
    rsa_ca_key = key_of("rsa-2048")
    rsa_ca = issue_ca(
        subject=cn_name("RSA CA"),
        public_key=rsa_ca_key.public_key(),
        issuer=None,
        issuer_key=rsa_ca_key,
        validity=DAY,
        now=now,
        path_length=None,
    )
    assert isinstance(rsa_ca.signature_hash_algorithm, hashes.SHA256)


def test_profile_refuses_non_positive_validity():
    for validity in (dt.timedelta(0), -DAY):
        with pytest.raises(ValueError, match="validity"):
            Profile(name="bad", kind=Kind.OPERATIONAL, validity=validity)


def test_issue_ca_root_is_self_signed_and_verifies(ca, now):
    root = ca.root
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    assert root.not_valid_before_utc == now - BACKDATE
    assert root.not_valid_after_utc == now + 3650 * DAY


@pytest.mark.parametrize(
    ("role", "path_length"), [("root", 1), ("issuing", 0)], ids=["ok/root", "ok/issuing"]
)
def test_issue_ca_marks_a_ca_with_cert_and_crl_signing(ca, role, path_length):
    cert = ca.root if role == "root" else ca.issuing
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=True, path_length=path_length)
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign


def test_issue_ca_intermediate_is_signed_by_root_and_clamped_to_it(ca, key_of, now):
    ca.issuing.verify_directly_issued_by(ca.root)
    key = key_of("ec-p256")
    long_lived = issue_ca(
        subject=cn_name("Long-lived CA"),
        public_key=key.public_key(),
        issuer=ca.root,
        issuer_key=ca.root_key,
        validity=100 * 365 * DAY,
        now=now,
        path_length=0,
    )
    assert long_lived.not_valid_after_utc == ca.root.not_valid_after_utc


@pytest.mark.parametrize(
    ("kind", "key_type", "purpose"),
    [
        (Kind.OPERATIONAL, "ec-p256", "sslclient"),
        (Kind.OPERATIONAL, "rsa-2048", "sslclient"),
        (Kind.TLS_SERVER, "ec-p256", "sslserver"),
    ],
    ids=["ok/operational-ec", "ok/operational-rsa", "ok/tls-server-ec"],
)
def test_openssl_verifies_leaf_through_intermediate_to_root(
    ca, issue, key_of, now, openssl, tmp_path, kind, key_type, purpose
):
    leaf = issue(
        profile=Profile(name=kind.value, kind=kind, validity=30 * DAY),
        key=key_of(key_type).public_key(),
        sans=x509.SubjectAlternativeName([x509.DNSName("dev-1.example")]),
        crl_urls=("http://crl.example/issuing.crl",),
    )
    files = {"root.pem": ca.root, "inter.pem": ca.issuing, "leaf.pem": leaf}
    for file_name, cert in files.items():
        (tmp_path / file_name).write_bytes(certs_to_pem([cert]))
    out = openssl(
        "verify", "-attime", str(int(now.timestamp())), "-purpose", purpose,
        "-CAfile", str(tmp_path / "root.pem"), "-untrusted", str(tmp_path / "inter.pem"),
        str(tmp_path / "leaf.pem"),
    )  # fmt: skip
    assert out.strip().endswith("OK")


@pytest.mark.parametrize(
    "case",
    ["without-intermediate", "foreign-root", "after-expiry"],
    ids=lambda c: f"fail/{c}",
)
def test_openssl_refuses_a_broken_chain(ca, foreign_ca, issue, now, openssl, tmp_path, case):
    leaf = issue()
    root = foreign_ca.root if case == "foreign-root" else ca.root
    at = now + 31 * DAY if case == "after-expiry" else now
    (tmp_path / "root.pem").write_bytes(certs_to_pem([root]))
    (tmp_path / "leaf.pem").write_bytes(certs_to_pem([leaf]))
    untrusted = (
        [] if case == "without-intermediate" else ["-untrusted", str(tmp_path / "inter.pem")]
    )
    (tmp_path / "inter.pem").write_bytes(certs_to_pem([ca.issuing]))
    openssl(
        "verify", "-attime", str(int(at.timestamp())), "-CAfile", str(tmp_path / "root.pem"),
        *untrusted, str(tmp_path / "leaf.pem"), ok=False,
    )  # fmt: skip


def test_leaf_pem_is_readable_by_openssl(issue, openssl):
    text = openssl("x509", "-noout", "-text", stdin=issue().public_bytes(Encoding.PEM))
    assert "TLS Web Client Authentication" in text
    assert "CA:FALSE" in text


def _operator_ca(ca, key_of, now) -> x509.Certificate:
    """An intermediate made elsewhere: as estkit would make it, but its SKI is the
    SHA-256 of its SubjectPublicKeyInfo truncated to 160 bits, not the SHA-1 of the
    key that estkit's CAs carry."""
    key = key_of("ec-p384")
    made_here = issue_ca(
        subject=cn_name("Operator Issuing CA"),
        public_key=key.public_key(),
        issuer=ca.root,
        issuer_key=ca.root_key,
        validity=365 * DAY,
        now=now,
        path_length=0,
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
    ski = x509.SubjectKeyIdentifier(digest.finalize()[:20])
    assert ski != ext(made_here, x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(made_here.subject)
        .issuer_name(made_here.issuer)
        .public_key(made_here.public_key())
        .serial_number(made_here.serial_number)
        .not_valid_before(made_here.not_valid_before_utc)
        .not_valid_after(made_here.not_valid_after_utc)
    )
    for e in made_here.extensions:
        value = ski if isinstance(e.value, x509.SubjectKeyIdentifier) else e.value
        builder = builder.add_extension(value, e.critical)
    return builder.sign(ca.root_key, hashes.SHA256())


def test_aki_is_the_issuers_own_ski_whatever_method_made_it(ca, key_of, now, openssl, tmp_path):
    operator = _operator_ca(ca, key_of, now)
    leaf = issue_leaf(
        profile=OPERATIONAL,
        public_key=key_of("ec-p256").public_key(),
        subject=cn_name("dev-1"),
        sans=None,
        issuer=operator,
        issuer_key=key_of("ec-p384"),
        now=now,
    )
    crl = build_crl(
        issuer=operator, issuer_key=key_of("ec-p384"), revoked=[], now=now, validity=DAY, number=1
    )
    operator_ski = ext(operator, x509.SubjectKeyIdentifier).value.digest
    assert ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == operator_ski
    crl_aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert crl_aki.key_identifier == operator_ski
    # OpenSSL picks the issuer by AKI = SKI: a mismatch fails the chain.
    files = {"root.pem": ca.root, "inter.pem": operator, "leaf.pem": leaf}
    for file_name, cert in files.items():
        (tmp_path / file_name).write_bytes(certs_to_pem([cert]))
    out = openssl(
        "verify", "-attime", str(int(now.timestamp())), "-CAfile", str(tmp_path / "root.pem"),
        "-untrusted", str(tmp_path / "inter.pem"), str(tmp_path / "leaf.pem"),
    )  # fmt: skip
    assert out.strip().endswith("OK")
