"""strongSwan ``pki`` 5.9.8 as an independent EST client against a real estkit server.

What the peer does (FIELD-NOTES "EST peers"): it appends
``/.well-known/est/<op>`` to ``--url`` and has no label option, so it reaches
only the default label; it sends one-line base64 and Basic credentials up
front; ``--cert/--key`` always means ``/simplereenroll`` (so it cannot enroll
with a bootstrap certificate: estkit's 403 is right); it cannot decode wrapped
base64 responses, so estkit recognises its requests and answers them in one
line while every other client gets 64-column lines (``server/quirks.py``;
``test_est_wire.py`` and ``test_interop_curl.py`` decode the same default server's
bodies with ``openssl base64 -d``). It prints TPM plugin noise on stderr, and on
a refusal ``EST request failed: HTTP <status>``, which the tests read.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from estkit.pki.certs import serial_hex
from estkit.server.config import load_config
from estkit.store import SqlStore
from estserver import set_config
from estutil import openssl_verify

PKI = "/usr/bin/pki"
_REFUSAL = re.compile(r"EST request failed: HTTP (\d{3})")


@dataclass(frozen=True, slots=True)
class Trust:
    root: Path  # the trust anchor: root CA, also the TLS server certificate's issuer
    devices_ca: Path  # the issuing CA of operational certificates, alone
    devices_chain: Path  # devices CA + root, as `estkit ca chain --ca devices` prints it


@dataclass(frozen=True, slots=True)
class Pki:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def refused_with(self) -> int | None:
        """The HTTP status pki reports for a refused request, if it reports one."""
        m = _REFUSAL.search(self.stderr)
        return int(m.group(1)) if m else None


def pki(*args: str | Path) -> Pki:
    proc = subprocess.run(
        [PKI, *map(str, args)],
        capture_output=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return Pki(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))


def pki_ok(*args: str | Path) -> bytes:
    out = pki(*args)
    assert out.returncode == 0, f"pki {' '.join(map(str, args))}: {out.stderr}"
    return out.stdout


def pki_key_and_csr(directory: Path, name: str, cn: str) -> tuple[Path, Path]:
    """An EC P-256 key and a DER CSR made by pki (CN as a PrintableString)."""
    key, csr = directory / f"{name}.key.pem", directory / f"{name}.csr.der"
    key.write_bytes(pki_ok("--gen", "--type", "ecdsa", "--size", "256", "--outform", "pem"))
    csr.write_bytes(
        pki_ok("--req", "--type", "ecdsa", "--in", key, "--dn", f"CN={cn}", "--outform", "der")
    )
    return key, csr


def openssl_key_and_csr(directory: Path, name: str, cn: str) -> tuple[Path, Path]:
    """An EC P-256 key and a DER CSR made by openssl (CN as a UTF8String)."""
    key, csr = directory / f"{name}.key.pem", directory / f"{name}.csr.der"
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key]
    subprocess.run(
        ["openssl", "req", "-new", *new_key, "-subj", f"/CN={cn}", "-outform", "DER", "-out", csr],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return key, csr


def est_enroll(server, trust: Trust, *args: str | Path) -> Pki:
    return pki(
        "--est", "--url", server.origin, "--cacert", trust.root, "--cacert", trust.devices_ca,
        "--outform", "pem", *args,
    )  # fmt: skip


def issued_serials(server, device: str) -> list[str]:
    """Serials the server has recorded for a device (its database, read-only)."""
    store = SqlStore.open(load_config(server.data_dir).database_url)
    try:
        return [r.serial for r in store.certificates_of(device)]
    finally:
        store.close()


def issued_record(server, serial: str):
    store = SqlStore.open(load_config(server.data_dir).database_url)
    try:
        return store.get_certificate(serial)
    finally:
        store.close()


def serial_of(cert: x509.Certificate) -> str:
    return serial_hex(cert.serial_number)


def public_key_der(key_pem: Path) -> bytes:
    key = load_pem_private_key(key_pem.read_bytes(), password=None)
    return key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def cert_public_key_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def trust(est_server, tmp_path_factory: pytest.TempPathFactory) -> Trust:
    d = tmp_path_factory.mktemp("strongswan-trust")
    chain_pem = est_server.cli("ca", "chain", "--ca", "devices").stdout.encode()
    chain = x509.load_pem_x509_certificates(chain_pem)
    (d / "devices-chain.pem").write_bytes(chain_pem)
    (d / "devices-ca.pem").write_bytes(chain[0].public_bytes(Encoding.PEM))
    return Trust(est_server.root_pem, d / "devices-ca.pem", d / "devices-chain.pem")


def enroll_with_secret(server, trust: Trust, tmp: Path, device: str) -> tuple[Path, Path]:
    """A first operational certificate through Basic auth; returns (key, cert)."""
    secret = server.cli("device", "add", device).stdout.strip()
    key, csr = pki_key_and_csr(tmp, "first", device)
    cert = tmp / "first.cert.pem"
    cert.write_bytes(
        _ok(est_enroll(server, trust, "--in", csr, "--userpass", f"{device}:{secret}"))
    )
    return key, cert


def _ok(out: Pki) -> bytes:
    assert out.returncode == 0, out.stderr
    return out.stdout


# -- cacerts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url_suffix", "refused_with"),
    [("", None), ("/", None), ("/.well-known/est/devices", 404)],
    ids=["ok/origin", "ok/origin-trailing-slash", "fail/label-in-url-is-doubled-by-pki"],
)
def test_estca_returns_devices_ca_and_root_from_the_default_label(
    est_server, trust, url_suffix, refused_with
):
    # pki 5.9.8 has no --label: it appends /.well-known/est/cacerts to any URL, so
    # ".../est/devices" becomes ".../est/devices/.well-known/est/cacerts" (404).
    out = pki(
        "--estca", "--url", est_server.origin + url_suffix, "--cacert", trust.root,
        "--outform", "pem",
    )  # fmt: skip

    if refused_with is not None:
        assert out.returncode != 0
        assert out.refused_with == refused_with
        assert out.stdout == b""
        return
    assert out.returncode == 0, out.stderr
    got = x509.load_pem_x509_certificates(out.stdout)
    expected = x509.load_pem_x509_certificates(trust.devices_chain.read_bytes())
    assert len(got) == 2
    assert {c.public_bytes(Encoding.DER) for c in got} == {
        c.public_bytes(Encoding.DER) for c in expected
    }
    assert "Root CA cert is trusted" in out.stderr
    assert "Sub CA cert is trusted" in out.stderr


# -- simpleenroll with a one-time enrollment secret ------------------------------------


@pytest.mark.parametrize(
    ("csr_cn", "credentials", "refused_with"),
    [
        ("device", "own-secret", None),
        ("device", "wrong-secret", 401),
        ("other", "own-secret", 403),
    ],
    ids=["ok/own-secret-own-cn", "fail/wrong-secret", "fail/csr-cn-not-the-device-id"],
)
def test_pki_basic_enroll_binds_the_secret_to_the_device_id(
    est_server, trust, device_id, tmp_path, csr_cn, credentials, refused_with
):
    secret = est_server.cli("device", "add", device_id).stdout.strip()
    assert secret and "\n" not in secret
    if credentials == "wrong-secret":
        secret = secret[::-1] + "x"
    cn = device_id if csr_cn == "device" else f"{device_id}-other"
    key, csr = pki_key_and_csr(tmp_path, "dev", cn)

    out = est_enroll(est_server, trust, "--in", csr, "--userpass", f"{device_id}:{secret}")

    if refused_with is not None:
        assert out.returncode != 0
        assert out.refused_with == refused_with
        assert out.stdout == b""
        assert issued_serials(est_server, device_id) == []
        return
    assert out.returncode == 0, out.stderr
    (cert,) = x509.load_pem_x509_certificates(out.stdout)
    devices_ca = x509.load_pem_x509_certificate(trust.devices_ca.read_bytes())
    assert cert.subject.rfc4514_string() == f"CN={device_id}"
    assert cert.issuer == devices_ca.subject
    assert cert_public_key_der(cert) == public_key_der(key)
    path = tmp_path / "cert.pem"
    path.write_bytes(out.stdout)
    verified = openssl_verify(trust.root, trust.devices_chain, path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.strip() == f"{path}: OK"
    assert issued_serials(est_server, device_id) == [serial_of(cert)]


def test_pki_basic_enroll_secret_works_only_once(est_server, trust, device_id, tmp_path):
    secret = est_server.cli("device", "add", device_id).stdout.strip()
    _, csr = pki_key_and_csr(tmp_path, "dev", device_id)
    first = est_enroll(est_server, trust, "--in", csr, "--userpass", f"{device_id}:{secret}")
    assert first.returncode == 0, first.stderr
    (cert,) = x509.load_pem_x509_certificates(first.stdout)

    second = est_enroll(est_server, trust, "--in", csr, "--userpass", f"{device_id}:{secret}")

    assert second.returncode != 0
    assert second.refused_with == 401
    assert second.stdout == b""
    assert issued_serials(est_server, device_id) == [serial_of(cert)]


# -- simplereenroll (pki --cert/--key) ----------------------------------------------------


@pytest.mark.parametrize(
    ("first_csr_by", "renew_cn", "refused_with"),
    [
        ("pki", "device", None),
        ("openssl", "device", None),
        ("pki", "other", 403),
    ],
    ids=[
        "ok/rekey-same-subject",
        "ok/utf8-name-renewed-with-printable-name-csr",
        "fail/csr-for-another-cn",
    ],
)
def test_pki_reenroll_renews_the_operational_certificate_with_a_new_key(
    est_server, trust, device_id, tmp_path, first_csr_by, renew_cn, refused_with
):
    secret = est_server.cli("device", "add", device_id).stdout.strip()
    make_first = pki_key_and_csr if first_csr_by == "pki" else openssl_key_and_csr
    old_key, first_csr = make_first(tmp_path, "first", device_id)
    old_cert_path = tmp_path / "first.cert.pem"
    old_cert_path.write_bytes(
        _ok(est_enroll(est_server, trust, "--in", first_csr, "--userpass", f"{device_id}:{secret}"))
    )
    old = x509.load_pem_x509_certificate(old_cert_path.read_bytes())
    cn = device_id if renew_cn == "device" else f"{device_id}-other"
    new_key, csr = pki_key_and_csr(tmp_path, "renew", cn)

    out = est_enroll(est_server, trust, "--in", csr, "--cert", old_cert_path, "--key", old_key)

    if refused_with is not None:
        assert out.returncode != 0
        assert out.refused_with == refused_with
        assert out.stdout == b""
        assert issued_serials(est_server, device_id) == [serial_of(old)]
        return
    assert out.returncode == 0, out.stderr
    (new,) = x509.load_pem_x509_certificates(out.stdout)
    assert new.subject.public_bytes() == old.subject.public_bytes()
    assert new.serial_number != old.serial_number
    assert new.issuer == old.issuer
    assert cert_public_key_der(new) == public_key_der(new_key)
    assert cert_public_key_der(new) != public_key_der(old_key)
    path = tmp_path / "renewed.pem"
    path.write_bytes(out.stdout)
    assert openssl_verify(trust.root, trust.devices_chain, path).returncode == 0
    assert issued_serials(est_server, device_id) == [serial_of(old), serial_of(new)]
    record = issued_record(est_server, serial_of(new))
    assert record.requested_via == "est-simplereenroll"  # pki --cert means /simplereenroll
    assert record.replaces == serial_of(old)


@pytest.mark.parametrize(
    "credential",
    ["bootstrap-cert", "revoked-operational-cert", "disabled-device"],
    ids=[
        "fail/bootstrap-cert-cannot-reenroll",
        "fail/revoked-operational-cert",
        "fail/disabled-device",
    ],
)
def test_pki_reenroll_is_refused_without_a_live_operational_certificate(
    est_server, trust, device_id, tmp_path, credential
):
    # pki --cert/--key always posts to /simplereenroll; a device that only has its
    # bootstrap certificate must use /simpleenroll, which pki cannot do.
    if credential == "bootstrap-cert":
        est_server.cli("device", "bootstrap", device_id, "--out", tmp_path / "bootstrap")
        key, cert = tmp_path / "bootstrap" / "key.pem", tmp_path / "bootstrap" / "cert.pem"
    else:
        key, cert = enroll_with_secret(est_server, trust, tmp_path, device_id)
        if credential == "revoked-operational-cert":
            serial = serial_of(x509.load_pem_x509_certificate(cert.read_bytes()))
            est_server.cli("cert", "revoke", serial)
        else:
            est_server.cli("device", "disable", device_id)
    before = issued_serials(est_server, device_id)
    _, csr = pki_key_and_csr(tmp_path, "renew", device_id)

    out = est_enroll(est_server, trust, "--in", csr, "--cert", cert, "--key", key)

    assert out.returncode != 0
    assert out.refused_with == 403
    assert out.stdout == b""
    assert issued_serials(est_server, device_id) == before


# -- base64_line_length set in the config overrides the per-client choice ---------------


@pytest.mark.parametrize(
    ("line_length", "pki_reads_it", "openssl_reads_it"),
    [("64", False, True), ("0", True, False)],
    ids=["override/64-for-everyone", "override/one-line-for-everyone"],
)
def test_a_configured_line_length_applies_to_every_client(
    fresh_server, tmp_path, line_length, pki_reads_it, openssl_reads_it
):
    set_config(fresh_server.data_dir, "labels.devices", "base64_line_length", line_length)
    fresh_server.start()
    root = fresh_server.root_pem

    by_pki = pki("--estca", "--url", fresh_server.origin, "--cacert", root, "--outform", "pem")
    fetched = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "--cacert", root, f"{fresh_server.url}/cacerts"],
        capture_output=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    by_openssl = subprocess.run(
        ["openssl", "base64", "-d"], input=fetched, capture_output=True, timeout=30, check=False
    ).stdout

    assert (by_pki.returncode == 0) is pki_reads_it, by_pki.stderr
    if not pki_reads_it:
        assert "unknown format" in by_pki.stderr
    assert bool(by_openssl) is openssl_reads_it
    # One line for everyone breaks OpenSSL-based clients: the server says so at start.
    assert fresh_server.log_path is not None
    warned = "labels.devices.base64_line_length = 0" in fresh_server.log_path.read_text()
    assert warned is (line_length == "0")
