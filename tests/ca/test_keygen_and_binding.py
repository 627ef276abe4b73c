"""Server-side key generation (RFC 7030 4.4) and proof-of-possession linking (RFC 7030 3.5)
in the policy and the authority: the decisions and their codes, without a server."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import AttributeOID

from caenv import NOW, Cas, label, make_csr, refused
from estkit.ca import policy
from estkit.ca.authority import Authority
from estkit.ca.errors import Code
from estkit.ca.policy import Principal
from estkit.pki.keys import PrivateKey, generate_key, public_keys_match
from estkit.pki.serverkeygen import DECRYPT_KEY_IDENTIFIER
from estkit.store import SqlStore
from testpki import cn_name

Auth = Authority[SqlStore]
BINDING = bytes(range(12))  # a TLS 1.2 Finished is 12 bytes
KEYGEN = label(serverkeygen=True)


def csr(
    key: PrivateKey,
    cn: str = "dev-1",
    *,
    password: bytes | None = None,
    decrypt_key_id: bytes | None = None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(cn_name(cn))
    if password is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, password)
    if decrypt_key_id is not None:
        builder = builder.add_attribute(
            DECRYPT_KEY_IDENTIFIER, decrypt_key_id, _tag=_ASN1Type.OctetString
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


# -- channel binding, pure ----------------------------------------------------------------


B64 = base64.b64encode(BINDING)


@pytest.mark.parametrize(
    ("required", "password", "connection", "code"),
    [
        (False, None, None, None),
        (False, b"anything", BINDING, None),
        (True, B64, BINDING, None),
        (True, b"  " + B64 + b"\r\n", BINDING, None),
        (True, None, BINDING, Code.CHANNEL_BINDING_MISMATCH),
        (True, base64.b64encode(b"another connection!"), BINDING, Code.CHANNEL_BINDING_MISMATCH),
        (True, b"not base64 at all", BINDING, Code.CHANNEL_BINDING_MISMATCH),
        (True, base64.urlsafe_b64encode(b"\xff" * 12), b"\xff" * 12, Code.CHANNEL_BINDING_MISMATCH),
        (True, B64, None, Code.CHANNEL_BINDING_MISMATCH),
    ],
    ids=[
        "ok/not-required",
        "ok/not-required-password-ignored",
        "ok/binding",
        "ok/whitespace-around",
        "fail/no-challenge-password",
        "fail/other-connection",
        "fail/not-base64",
        "fail/url-safe-base64",
        "fail/connection-without-binding",
    ],
)
def test_channel_binding_in_challenge_password(
    key: PrivateKey,
    required: bool,
    password: bytes | None,
    connection: bytes | None,
    code: Code | None,
) -> None:
    request = policy.parse_request(csr(key, password=password))
    lb = label(require_channel_binding=required)
    if code is None:
        policy.check_channel_binding(lb, request, connection)
    else:
        refused(code, lambda: policy.check_channel_binding(lb, request, connection))


# -- serverkeygen, pure ----------------------------------------------------------------------


def test_serverkeygen_off_by_default_is_not_found(key: PrivateKey) -> None:
    request = policy.parse_request(csr(key))
    who = Principal(device_id="dev-1", actor="secret:dev-1")
    refused(Code.NOT_FOUND, lambda: policy.decide_serverkeygen(label(), request, who))


@pytest.mark.parametrize(
    ("cn", "code"),
    [("dev-1", None), ("dev-2", Code.NAME_MISMATCH)],
    ids=["ok/own-id", "fail/other-id"],
)
def test_serverkeygen_follows_the_enroll_rule(key: PrivateKey, cn: str, code: Code | None) -> None:
    request = policy.parse_request(csr(key, cn))
    who = Principal(device_id="dev-1", actor="secret:dev-1")
    if code is not None:
        refused(code, lambda: policy.decide_serverkeygen(KEYGEN, request, who))
        return
    grant = policy.decide_serverkeygen(KEYGEN, request, who)
    assert grant.subject == cn_name("dev-1") and grant.public_key is None


def _rsa_cert(cas: Cas, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> x509.Certificate:
    from caenv import OPERATIONAL
    from estkit.pki.profiles import issue_leaf

    return issue_leaf(
        profile=OPERATIONAL,
        public_key=key.public_key(),
        subject=cn_name("dev-1"),
        sans=None,
        issuer=cas.devices.cert,
        issuer_key=cas.devices.key,
        now=NOW,
    )


def _ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def test_key_recipient_is_the_device_certificate_the_identifier_names(cas: Cas) -> None:
    rsa_cert = _rsa_cert(cas, generate_key("rsa-2048"))
    ec_cert = _rsa_cert(cas, generate_key("ec-p256"))
    assert policy.key_recipient(_ski(rsa_cert), [ec_cert, rsa_cert]) is rsa_cert
    unknown = refused(Code.BAD_REQUEST, lambda: policy.key_recipient(b"\x01" * 20, [rsa_cert]))
    assert "unknown key" in unknown.reason
    ec_only = refused(Code.BAD_REQUEST, lambda: policy.key_recipient(_ski(ec_cert), [ec_cert]))
    assert "RSA" in ec_only.reason


# -- the authority -----------------------------------------------------------------------------


def _bootstrapped(authority: Auth, device_id: str = "dev-1") -> Principal:
    issued = authority.issue_bootstrap(
        make_csr(generate_key("ec-p256"), device_id), device_id=device_id, actor="t", now=NOW
    )
    return authority.authenticate_certificate(issued.certificate, now=NOW)


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa-2048"])
def test_serverkeygen_issues_for_a_generated_key_and_audits_it(
    authority: Auth, store: SqlStore, key: PrivateKey, key_type: str
) -> None:
    who = _bootstrapped(authority)
    lb = replace(authority.labels["devices"], serverkeygen=True, serverkeygen_key_type=key_type)
    made = authority.serverkeygen(lb, csr(key), who, now=NOW)
    cert = made.issued.certificate
    assert public_keys_match(cert.public_key(), made.key.public_key())
    assert not public_keys_match(cert.public_key(), key.public_key())  # the CSR's is ignored
    assert cert.subject == cn_name("dev-1") and made.encrypt_to is None
    assert made.issued.record.requested_via == "est-serverkeygen"
    entry = store.list_audit(limit=1000).items[-1]
    assert (entry.action, entry.outcome, entry.serial) == (
        "est-serverkeygen",
        "ok",
        made.issued.record.serial,
    )
    assert "key=" not in repr(made)  # the key is kept out of any log line


def test_serverkeygen_refusals_are_audited_and_cost_no_key(
    authority: Auth, store: SqlStore, key: PrivateKey
) -> None:
    who = _bootstrapped(authority)
    refused(
        Code.NOT_FOUND,
        lambda: authority.serverkeygen(authority.labels["devices"], csr(key), who, now=NOW),
    )
    lb = replace(authority.labels["devices"], serverkeygen=True)
    refused(Code.NAME_MISMATCH, lambda: authority.serverkeygen(lb, csr(key, "dev-2"), who, now=NOW))
    bound = replace(lb, require_channel_binding=True)
    refused(
        Code.CHANNEL_BINDING_MISMATCH,
        lambda: authority.serverkeygen(bound, csr(key), who, now=NOW, channel_binding=BINDING),
    )
    details = [e.detail.split(":")[0] for e in store.list_audit(limit=1000).items[-3:]]
    assert details == ["not-found", "name-mismatch", "channel-binding-mismatch"]
    made = authority.serverkeygen(
        bound, csr(key, password=B64), who, now=NOW, channel_binding=BINDING
    )
    assert made.issued.record.device_id == "dev-1"


def test_serverkeygen_envelopes_the_key_to_the_device_rsa_certificate(
    authority: Auth, key: PrivateKey
) -> None:
    who = _bootstrapped(authority)
    device_key = generate_key("rsa-2048")
    assert isinstance(device_key, rsa.RSAPrivateKey)
    lb = replace(authority.labels["devices"], serverkeygen=True)
    current = authority.enroll(lb, make_csr(device_key), who, now=NOW).certificate
    made = authority.serverkeygen(lb, csr(key, decrypt_key_id=_ski(current)), who, now=NOW)
    assert made.encrypt_to == current
    from estkit.pki.serverkeygen import envelope_key, private_key_der

    enveloped = envelope_key(private_key_der(made.key), current)
    plain = pkcs7.pkcs7_decrypt_der(enveloped, current, device_key, [])
    assert plain == private_key_der(made.key)
    refused(
        Code.BAD_REQUEST,
        lambda: authority.serverkeygen(lb, csr(key, decrypt_key_id=b"\x07" * 20), who, now=NOW),
    )


def test_an_authority_refuses_serverkeygen_with_approval(authority: Auth) -> None:
    labels = {"devices": replace(authority.labels["devices"], serverkeygen=True, approval=True)}
    with pytest.raises(ValueError, match="approval"):
        Authority(
            cas=authority.cas,
            labels=labels,
            bootstrap_profile=authority.bootstrap_profile,
            store=authority.store,
            secret_validity=authority.secret_validity,
        )
