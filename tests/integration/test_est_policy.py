"""EST policy through a real server: what is issued, what is refused; refusals issue nothing."""

from __future__ import annotations

import base64
import datetime as dt
import ssl
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from estkit.pki.keys import generate_key
from estkit.pki.profiles import Kind, Profile, issue_ca, issue_leaf
from estserver import EstServer
from estutil import (
    Identity,
    audit_rows,
    count_certificates,
    csr_der,
    http,
    issued_cert,
    new_key,
    post_csr,
)


def test_bootstrap_cert_enrolls_operational_cert_with_profile_extensions(
    est_server: EstServer, device_id: str, bootstrap: Identity
) -> None:
    key = new_key()
    with http(est_server.root_pem, bootstrap) as client:
        response = post_csr(client, f"{est_server.url}/simpleenroll", csr_der(key, device_id))
    cert = issued_cert(response)
    assert response.headers["content-type"].startswith("application/pkcs7-mime")
    assert response.headers["content-transfer-encoding"] == "base64"
    assert max(map(len, response.content.splitlines())) == 64  # not pki: wrapped (quirks.py)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
    assert cert.public_key() == key.public_key()
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.key_encipherment
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)
    assert ("est-simpleenroll", "ok") in [
        (a, o) for a, o, _ in audit_rows(est_server.data_dir, device_id)
    ]


@pytest.mark.parametrize(
    ("case", "status", "code", "reason"),
    [
        ("not-base64", 400, "bad-csr", "base64"),
        ("not-a-csr", 400, "bad-csr", "PKCS#10"),
        ("bad-signature", 400, "bad-csr", "signature"),
        ("wrong-content-type", 415, None, "application/pkcs10"),
        ("too-large", 413, None, "bytes"),
        ("other-device-cn", 403, "name-mismatch", "device id"),
        ("ca-true", 400, "bad-csr", "CA"),
        ("rsa-1024", 400, "key-not-permitted", "not allowed"),
        ("san-email-not-permitted", 403, "san-not-permitted", "subjectAltName"),
    ],
    ids=lambda v: f"fail/{v}" if isinstance(v, str) and "-" in v else None,
)
def test_bad_enroll_request_gets_reason_and_issues_nothing(
    est_server: EstServer,
    device_id: str,
    bootstrap: Identity,
    case: str,
    status: int,
    code: str | None,
    reason: str,
) -> None:
    key = new_key()
    der = csr_der(key, device_id)
    body: bytes | None = None
    content_type = "application/pkcs10"
    if case == "not-base64":
        body = b"this is *not* base64!"
    elif case == "not-a-csr":
        body = base64.b64encode(b"\x30\x03\x02\x01\x01")
    elif case == "bad-signature":
        tampered = bytearray(der)
        tampered[-5] ^= 0x01
        der = bytes(tampered)
    elif case == "wrong-content-type":
        content_type = "application/octet-stream"
    elif case == "too-large":
        body = b"A" * 70_000
    elif case == "other-device-cn":
        der = csr_der(key, f"{device_id}-other")
    elif case == "ca-true":
        der = csr_der(key, device_id, ca=True)
    elif case == "rsa-1024":
        from cryptography.hazmat.primitives.asymmetric import rsa

        der = csr_der(rsa.generate_private_key(public_exponent=65537, key_size=1024), device_id)  # type: ignore[arg-type]  # noqa: S505
    elif case == "san-email-not-permitted":
        der = csr_der(key, device_id, sans=[x509.RFC822Name("x@example.com")])
    before = count_certificates(est_server.data_dir)
    with http(est_server.root_pem, bootstrap) as client:
        response = post_csr(
            client, f"{est_server.url}/simpleenroll", der, body=body, content_type=content_type
        )
    assert response.status_code == status, response.text
    assert response.headers.get("estkit-refusal-code") == code
    assert response.headers["content-type"].startswith("text/plain")
    assert reason in response.text
    assert response.text.count("\n") == 1
    assert count_certificates(est_server.data_dir) == before


def test_san_of_permitted_type_is_carried_and_nothing_else_from_the_csr(
    est_server: EstServer, device_id: str, bootstrap: Identity
) -> None:
    key = new_key()
    der = csr_der(key, device_id, sans=[x509.DNSName(f"{device_id}.devices.example")], ca=False)
    with http(est_server.root_pem, bootstrap) as client:
        cert = issued_cert(post_csr(client, f"{est_server.url}/simpleenroll", der))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [f"{device_id}.devices.example"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_no_credentials_get_basic_challenge(est_server: EstServer, device_id: str) -> None:
    with http(est_server.root_pem) as client:
        response = post_csr(client, f"{est_server.url}/simpleenroll", csr_der(new_key(), device_id))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Basic realm="estkit"'


def test_enrollment_secret_is_one_time(est_server: EstServer, device_id: str) -> None:
    secret = est_server.cli("device", "add", device_id).stdout.strip()
    assert len(secret) >= 24
    with http(est_server.root_pem) as client:
        first = post_csr(
            client,
            f"{est_server.url}/simpleenroll",
            csr_der(new_key(), device_id),
            auth=(device_id, secret),
        )
        issued_cert(first)
        before = count_certificates(est_server.data_dir)
        again = post_csr(
            client,
            f"{est_server.url}/simpleenroll",
            csr_der(new_key(), device_id),
            auth=(device_id, secret),
        )
        wrong = post_csr(
            client,
            f"{est_server.url}/simpleenroll",
            csr_der(new_key(), device_id),
            auth=(device_id, secret + "x"),
        )
    assert again.status_code == 401 and wrong.status_code == 401
    assert count_certificates(est_server.data_dir) == before


def test_enrollment_secret_binds_cn_to_its_device(est_server: EstServer, device_id: str) -> None:
    secret = est_server.cli("device", "add", device_id).stdout.strip()
    with http(est_server.root_pem) as client:
        other = post_csr(
            client,
            f"{est_server.url}/simpleenroll",
            csr_der(new_key(), "someone-else"),
            auth=(device_id, secret),
        )
        own = post_csr(
            client,
            f"{est_server.url}/simpleenroll",
            csr_der(new_key(), device_id),
            auth=(device_id, secret),
        )
    assert other.status_code == 403
    # A refused request does not consume the secret.
    issued_cert(own)


def test_reenroll_with_operational_cert_rekeys_and_keeps_subject(
    est_server: EstServer, device_id: str, operational: Identity
) -> None:
    key = new_key()
    with http(est_server.root_pem, operational) as client:
        response = post_csr(client, f"{est_server.url}/simplereenroll", csr_der(key, device_id))
    cert = issued_cert(response)
    assert cert.subject == operational.cert.subject
    assert cert.public_key() == key.public_key()
    assert cert.serial_number != operational.cert.serial_number


def test_reenroll_accepts_printablestring_subject_and_keeps_original_encoding(
    est_server: EstServer, device_id: str, operational: Identity
) -> None:
    printable = x509.Name(
        [
            x509.NameAttribute(
                NameOID.COMMON_NAME, device_id, _type=x509.name._ASN1Type.PrintableString
            )
        ]
    )
    assert printable.public_bytes() != operational.cert.subject.public_bytes()
    with http(est_server.root_pem, operational) as client:
        response = post_csr(
            client,
            f"{est_server.url}/simplereenroll",
            csr_der(new_key(), device_id, subject=printable),
        )
    cert = issued_cert(response)
    assert cert.subject.public_bytes() == operational.cert.subject.public_bytes()


@pytest.mark.parametrize(
    ("change", "reason"),
    [("subject", "subject"), ("san", "subjectAltName")],
    ids=["fail/changed-subject", "fail/added-san"],
)
def test_reenroll_with_changed_names_is_refused(
    est_server: EstServer, device_id: str, operational: Identity, change: str, reason: str
) -> None:
    if change == "subject":
        der = csr_der(new_key(), f"{device_id}-x")
    else:
        der = csr_der(new_key(), device_id, sans=[x509.DNSName("extra.example")])
    before = count_certificates(est_server.data_dir)
    with http(est_server.root_pem, operational) as client:
        response = post_csr(client, f"{est_server.url}/simplereenroll", der)
    assert response.status_code == 403
    assert response.headers["estkit-refusal-code"] == "subject-changed"
    assert reason in response.text
    assert count_certificates(est_server.data_dir) == before


def test_reenroll_with_bootstrap_cert_is_refused(
    est_server: EstServer, device_id: str, bootstrap: Identity
) -> None:
    with http(est_server.root_pem, bootstrap) as client:
        response = post_csr(
            client, f"{est_server.url}/simplereenroll", csr_der(new_key(), device_id)
        )
    assert response.status_code == 403
    assert response.headers["estkit-refusal-code"] == "wrong-ca"
    assert "operational certificate" in response.text


def test_operational_cert_may_renew_through_simpleenroll(
    est_server: EstServer, device_id: str, operational: Identity
) -> None:
    with http(est_server.root_pem, operational) as client:
        cert = issued_cert(
            post_csr(client, f"{est_server.url}/simpleenroll", csr_der(new_key(), device_id))
        )
    assert cert.subject == operational.cert.subject


def test_revoked_certificate_is_refused(
    est_server: EstServer, device_id: str, operational: Identity
) -> None:
    serial = f"{operational.cert.serial_number:x}"  # lower case: parsing is case-insensitive
    out = est_server.cli("cert", "revoke", serial, "--reason", "keyCompromise").stdout
    assert "revoked" in out
    with http(est_server.root_pem, operational) as client:
        response = post_csr(
            client, f"{est_server.url}/simplereenroll", csr_der(new_key(), device_id)
        )
    assert response.status_code == 403
    assert response.headers["estkit-refusal-code"] == "revoked"
    assert "revoked" in response.text
    again = est_server.cli("cert", "revoke", serial, check=False)
    assert again.returncode != 0 and "already revoked" in again.stderr


@pytest.mark.parametrize(
    "action", ["disable", "revoke"], ids=["fail/disabled", "fail/decommissioned"]
)
def test_disabled_or_decommissioned_device_is_refused_with_any_cert(
    est_server: EstServer, device_id: str, bootstrap: Identity, operational: Identity, action: str
) -> None:
    est_server.cli("device", action, device_id)
    with http(est_server.root_pem, bootstrap) as client:
        by_bootstrap = post_csr(
            client, f"{est_server.url}/simpleenroll", csr_der(new_key(), device_id)
        )
    with http(est_server.root_pem, operational) as client:
        by_operational = post_csr(
            client, f"{est_server.url}/simplereenroll", csr_der(new_key(), device_id)
        )
    assert by_bootstrap.status_code == 403 and by_operational.status_code == 403
    code = "disabled" if action == "disable" else "decommissioned"
    assert by_bootstrap.headers["estkit-refusal-code"] == code
    assert by_operational.headers["estkit-refusal-code"] == code
    assert code in by_bootstrap.text


def test_disabled_device_enabled_again_enrolls(
    est_server: EstServer, device_id: str, bootstrap: Identity
) -> None:
    est_server.cli("device", "disable", device_id)
    est_server.cli("device", "enable", device_id)
    with http(est_server.root_pem, bootstrap) as client:
        issued_cert(
            post_csr(client, f"{est_server.url}/simpleenroll", csr_der(new_key(), device_id))
        )


def test_client_cert_from_unknown_ca_fails_the_handshake(
    est_server: EstServer, device_id: str, tmp_path: Path
) -> None:
    now = dt.datetime.now(dt.UTC)
    ca_key = generate_key("ec-p256")
    ca = issue_ca(
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue CA")]),
        public_key=ca_key.public_key(),
        issuer=None,
        issuer_key=ca_key,
        validity=dt.timedelta(days=1),
        now=now,
        path_length=0,
    )
    key = new_key()
    leaf = issue_leaf(
        profile=Profile("p", Kind.BOOTSTRAP, dt.timedelta(days=1)),
        public_key=key.public_key(),
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]),
        sans=None,
        issuer=ca,
        issuer_key=ca_key,
        now=now,
    )
    rogue = Identity.write(tmp_path / "rogue", key, leaf)
    before = count_certificates(est_server.data_dir)
    with http(est_server.root_pem, rogue) as client, pytest.raises(httpx.TransportError):
        post_csr(client, f"{est_server.url}/simpleenroll", csr_der(key, device_id))
    assert count_certificates(est_server.data_dir) == before


def test_expired_operational_cert_is_refused_with_reason(
    fresh_server: EstServer, device_id: str, tmp_path: Path
) -> None:
    from estserver import set_config
    from integration.conftest import bootstrap_device, enroll_operational

    set_config(fresh_server.data_dir, "profiles.operational", "validity", '"2s"')
    fresh_server.start()
    boot = bootstrap_device(fresh_server, device_id, tmp_path / "b")
    op = enroll_operational(fresh_server, device_id, boot, tmp_path / "o")
    assert op.cert.not_valid_after_utc - op.cert.not_valid_before_utc <= dt.timedelta(seconds=3)
    time.sleep(
        max(0.0, (op.cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()) + 1.2
    )
    with http(fresh_server.root_pem, op) as client:
        response = post_csr(
            client, f"{fresh_server.url}/simplereenroll", csr_der(new_key(), device_id)
        )
    assert response.status_code == 403
    assert response.headers["estkit-refusal-code"] == "expired"
    assert "expired" in response.text


def test_unknown_label_is_404(est_server: EstServer) -> None:
    with http(est_server.root_pem) as client:
        response = client.get(f"{est_server.url}/nosuch/cacerts")
    assert response.status_code == 404
    assert response.headers["estkit-refusal-code"] == "not-found"
    assert "nosuch" in response.text


def test_health_certificate_echoes_client_cert(est_server: EstServer, bootstrap: Identity) -> None:
    with http(est_server.root_pem, bootstrap) as client:
        response = client.get(f"{est_server.origin}/health/certificate")
    assert response.status_code == 200
    assert x509.load_pem_x509_certificate(response.content) == bootstrap.cert
    with http(est_server.root_pem) as client:
        assert client.get(f"{est_server.origin}/health/certificate").status_code == 401


def test_tls12_and_tls13_are_both_served(est_server: EstServer) -> None:
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = ssl.create_default_context(cafile=str(est_server.root_pem))
        ctx.minimum_version = ctx.maximum_version = version
        with httpx.Client(verify=ctx) as client:
            assert client.get(f"{est_server.url}/cacerts").status_code == 200


def test_p384_csr_is_accepted(est_server: EstServer, device_id: str, bootstrap: Identity) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    with http(est_server.root_pem, bootstrap) as client:
        cert = issued_cert(
            post_csr(client, f"{est_server.url}/simpleenroll", csr_der(key, device_id))
        )
    assert cert.public_key() == key.public_key()


# -- what a certificate says is built by policy (issue 10, findings 4 and 5) -------------------


def test_enroll_never_copies_subject_attributes(
    est_server: EstServer, device_id: str, bootstrap: Identity
) -> None:
    subject = x509.Name.from_rfc4514_string(
        f"2.5.4.5=dev-b,OU=admins,O=x,CN={device_id}"  # serialNumber=dev-b
    )
    with http(est_server.root_pem, bootstrap) as client:
        response = post_csr(
            client,
            f"{est_server.url}/simpleenroll",
            csr_der(new_key(), device_id, subject=subject),
        )
    assert issued_cert(response).subject.rfc4514_string() == f"CN={device_id}"


@pytest.mark.parametrize(
    "sans",
    [
        [x509.DNSName("localhost")],
        [x509.DNSName("*.example.com")],
        [x509.DNSName("good.com\x00.evil")],
        [x509.DNSName(f"n{i}.example.com") for i in range(1500)],
    ],
    ids=["fail/localhost", "fail/wildcard", "fail/nul", "fail/1500-names"],
)
def test_enroll_refuses_dns_names_outside_policy(
    est_server: EstServer, device_id: str, bootstrap: Identity, sans: list[x509.GeneralName]
) -> None:
    before = count_certificates(est_server.data_dir)
    with http(est_server.root_pem, bootstrap) as client:
        response = post_csr(
            client, f"{est_server.url}/simpleenroll", csr_der(new_key(), device_id, sans=sans)
        )
    assert response.status_code == 403, response.text
    assert response.headers["estkit-refusal-code"] == "san-not-permitted"
    assert count_certificates(est_server.data_dir) == before


def test_an_operational_certificate_cannot_add_names_through_simpleenroll(
    est_server: EstServer, device_id: str, operational: Identity
) -> None:
    """simpleenroll with an operational certificate keeps simplereenroll's Subject/SAN rule."""
    before = count_certificates(est_server.data_dir)
    der = csr_der(new_key(), device_id, sans=[x509.DNSName("admin.example.com")])
    with http(est_server.root_pem, operational) as client:
        response = post_csr(client, f"{est_server.url}/simpleenroll", der)
    assert response.status_code == 403, response.text
    assert response.headers["estkit-refusal-code"] == "subject-changed"
    assert count_certificates(est_server.data_dir) == before
