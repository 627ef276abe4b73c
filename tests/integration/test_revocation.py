"""Revocation end to end: CRL distribution point → CRL over plain HTTP → openssl → EST refuses.

The CRLs are fetched from the server's own plain-HTTP listener, as a relying
party would, and read by ``openssl crl`` / ``openssl verify -crl_check``, not
by estkit's own code.
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from estkit.pki.certs import serial_hex
from estserver import EstServer, set_config
from estutil import Identity, csr_der, http, issued_cert, new_key, post_csr


@dataclass(frozen=True, slots=True)
class Trust:
    root: Path  # trust anchor
    devices_chain: Path  # devices CA + root, as `estkit ca chain --ca devices` prints it


@pytest.fixture(scope="module")
def trust(est_server: EstServer, tmp_path_factory: pytest.TempPathFactory) -> Trust:
    d = tmp_path_factory.mktemp("revocation-trust")
    (d / "devices-chain.pem").write_text(est_server.cli("ca", "chain", "--ca", "devices").stdout)
    return Trust(est_server.root_pem, d / "devices-chain.pem")


def fetch_crl(server: EstServer, ca: str) -> bytes:
    with urllib.request.urlopen(f"{server.crl_url}/{ca}.crl", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/pkix-crl"
        return bytes(response.read())


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


def openssl_crl_entries(der: bytes, directory: Path) -> dict[str, str]:
    """Serial (as ``openssl`` prints it) → reason text, from ``openssl crl -text`` alone."""
    path = directory / "fetched.crl"
    path.write_bytes(der)
    out = openssl("crl", "-inform", "DER", "-in", path, "-noout", "-text")
    assert out.returncode == 0, out.stderr
    entries: dict[str, str] = {}
    serial = None
    lines = iter(out.stdout.splitlines())
    for line in lines:
        if m := re.match(r"\s+Serial Number: ([0-9A-F]+)$", line):
            serial = m.group(1)
            entries[serial] = ""
        elif "X509v3 CRL Reason Code" in line and serial is not None:
            entries[serial] = next(lines).strip()
    return entries


def crl_pem(der: bytes, path: Path) -> Path:
    path.write_bytes(x509.load_der_x509_crl(der).public_bytes(Encoding.PEM))
    return path


def crl_distribution_point(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    return [name.value for dp in ext for name in dp.full_name or ()]


def serial_of(identity: Identity) -> str:
    return serial_hex(identity.cert.serial_number)


def reenroll(server: EstServer, identity: Identity, device_id: str) -> int:
    with http(server.root_pem, identity) as client:
        response = post_csr(client, f"{server.url}/simplereenroll", csr_der(new_key(), device_id))
    return response.status_code


# -- the distribution point and the published CRLs --------------------------------------


@pytest.mark.parametrize(
    ("which", "ca"),
    [("operational", "devices"), ("bootstrap", "bootstrap")],
    ids=["ok/operational-cert-points-at-devices-crl", "ok/bootstrap-cert-points-at-bootstrap-crl"],
)
def test_issued_cert_carries_its_cas_crl_url_as_distribution_point(
    est_server: EstServer, bootstrap: Identity, operational: Identity, which: str, ca: str
) -> None:
    cert = operational.cert if which == "operational" else bootstrap.cert
    assert crl_distribution_point(cert) == [f"{est_server.crl_url}/{ca}.crl"]


@pytest.mark.parametrize("ca", ["root", "devices", "bootstrap"], ids=lambda c: f"ok/{c}")
def test_crl_served_over_plain_http_is_read_by_openssl_and_signed_by_its_ca(
    est_server: EstServer, tmp_path: Path, ca: str
) -> None:
    der = fetch_crl(est_server, ca)
    path = tmp_path / f"{ca}.crl"
    path.write_bytes(der)
    ca_pem = est_server.data_dir / "ca" / f"{ca}.pem"

    out = openssl("crl", "-inform", "DER", "-in", path, "-noout", "-text", "-CAfile", ca_pem)

    assert out.returncode == 0, out.stderr
    assert "verify OK" in out.stderr + out.stdout
    issuer = x509.load_pem_x509_certificate(ca_pem.read_bytes()).subject
    assert x509.load_der_x509_crl(der).issuer == issuer
    assert "Next Update" in out.stdout


# -- revoking one certificate ------------------------------------------------------------


def test_revoked_cert_is_listed_in_crl_with_its_reason_and_refused_by_est(
    est_server: EstServer, device_id: str, operational: Identity, tmp_path: Path
) -> None:
    serial = serial_of(operational)
    assert serial not in openssl_crl_entries(fetch_crl(est_server, "devices"), tmp_path)

    est_server.cli("cert", "revoke", serial, "--reason", "keyCompromise")

    entries = openssl_crl_entries(fetch_crl(est_server, "devices"), tmp_path)
    assert entries.get(serial) == "Key Compromise"
    assert reenroll(est_server, operational, device_id) == 403


@pytest.mark.parametrize(
    ("which", "returncode", "verdict"),
    [("revoked", 2, "certificate revoked"), ("other", 0, ": OK")],
    ids=["fail/revoked-cert", "ok/unrevoked-cert-of-the-same-ca"],
)
def test_openssl_crl_check_rejects_only_the_revoked_cert(
    est_server: EstServer,
    trust: Trust,
    device_id: str,
    operational: Identity,
    tmp_path: Path,
    which: str,
    returncode: int,
    verdict: str,
) -> None:
    with http(est_server.root_pem, operational) as client:
        other_cert = issued_cert(
            post_csr(client, f"{est_server.url}/simplereenroll", csr_der(new_key(), device_id))
        )
    est_server.cli("cert", "revoke", serial_of(operational), "--reason", "keyCompromise")
    crl = crl_pem(fetch_crl(est_server, "devices"), tmp_path / "crl.pem")
    cert = operational.cert_path
    if which == "other":
        cert = tmp_path / "other.pem"
        cert.write_bytes(other_cert.public_bytes(Encoding.PEM))

    out = openssl(
        "verify", "-crl_check", "-CAfile", trust.root, "-untrusted", trust.devices_chain,
        "-CRLfile", crl, cert,
    )  # fmt: skip

    assert out.returncode == returncode, out.stdout + out.stderr
    assert verdict in out.stdout + out.stderr


# -- decommissioning a device ----------------------------------------------------------


def test_decommission_lists_bootstrap_and_operational_certs_and_est_refuses_both(
    est_server: EstServer,
    device_id: str,
    bootstrap: Identity,
    operational: Identity,
    tmp_path: Path,
) -> None:
    out = est_server.cli("device", "revoke", device_id).stdout
    assert "revoked 2 certificate(s)" in out

    in_bootstrap_crl = openssl_crl_entries(fetch_crl(est_server, "bootstrap"), tmp_path)
    in_devices_crl = openssl_crl_entries(fetch_crl(est_server, "devices"), tmp_path)
    assert in_bootstrap_crl.get(serial_of(bootstrap)) == "Cessation Of Operation"
    assert in_devices_crl.get(serial_of(operational)) == "Cessation Of Operation"
    with http(est_server.root_pem, bootstrap) as client:
        by_bootstrap = post_csr(
            client, f"{est_server.url}/simpleenroll", csr_der(new_key(), device_id)
        )
    assert by_bootstrap.status_code == 403, by_bootstrap.text
    assert reenroll(est_server, operational, device_id) == 403


# -- the plain-HTTP listener ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/crl/devices.crl", 200),
        ("/crl/nosuch.crl", 404),
        ("/crl/devices", 404),
        ("/crl/", 404),
        ("/", 404),
        ("/crl/../estkit.toml", 404),
        ("/crl/x/../root.key", 404),
        ("/crl/../ca/root.key", 404),
        ("/crl/%2e%2e/estkit.toml", 404),
        ("/crl/..%2fca%2froot.key", 404),
        ("/ca/root.pem", 404),
    ],
    ids=[
        "ok/devices-crl",
        "fail/unknown-ca",
        "fail/no-crl-suffix",
        "fail/directory",
        "fail/root",
        "fail/traversal-to-config",
        "fail/traversal-to-root-key",
        "fail/traversal-into-ca-dir",
        "fail/encoded-traversal",
        "fail/encoded-slash-traversal",
        "fail/outside-crl-prefix",
    ],
)
def test_crl_listener_serves_only_crls_by_name(
    est_server: EstServer, path: str, status: int
) -> None:
    # http.client sends the path as given: no client-side dot-segment removal.
    conn = HTTPConnection("localhost", est_server.crl_port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()

    assert response.status == status
    if status == 200:
        x509.load_der_x509_crl(body)
    else:
        assert b"PRIVATE KEY" not in body and b"[server]" not in body
        assert len(body) < 100


# -- freshness ---------------------------------------------------------------------------------


def test_crl_is_republished_before_it_expires(fresh_server: EstServer) -> None:
    set_config(fresh_server.data_dir, "crl", "validity", '"8s"')
    fresh_server.start()
    first = x509.load_der_x509_crl(fetch_crl(fresh_server, "devices"))
    assert first.next_update_utc - first.last_update_utc == dt.timedelta(seconds=8)

    deadline = time.monotonic() + 20
    latest = first
    while latest.last_update_utc == first.last_update_utc and time.monotonic() < deadline:
        time.sleep(0.5)
        fetched_at = dt.datetime.now(dt.UTC)
        latest = x509.load_der_x509_crl(fetch_crl(fresh_server, "devices"))
        # What is served is never past its nextUpdate.
        assert latest.next_update_utc > fetched_at, fresh_server.log()

    assert latest.last_update_utc > first.last_update_utc, "CRL not republished within 20 s"
    assert latest.next_update_utc - latest.last_update_utc == dt.timedelta(seconds=8)
    # Republished before expiry, not after it.
    assert latest.last_update_utc < first.next_update_utc
    number = x509.CRLNumber
    assert (
        latest.extensions.get_extension_for_class(number).value.crl_number
        > first.extensions.get_extension_for_class(number).value.crl_number
    )
