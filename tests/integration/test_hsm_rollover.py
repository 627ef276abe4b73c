"""Issuing-CA rollover on a server whose CA keys are in a PKCS#11 token (SoftHSM2).

``estkit ca rotate devices`` on the running server makes devices-2's key in the token;
after a restart of its two workers a device enrolls from devices before the switch and
re-enrolls with that certificate over mTLS from devices-2 after it. Each generation
signs its own CRL in the token; OpenSSL verifies the certificates and both CRLs.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import urllib.request
from pathlib import Path

from cryptography import x509

from cli.test_server_init_pkcs11 import ca_cert, private_key_files
from estserver import EstServer, set_config
from estutil import Identity, csr_der, http, issued_cert, new_key, post_csr
from integration.conftest import bootstrap_device, enroll_operational
from integration.test_hsm_server import (
    assert_verifies,
    hsm_server,  # noqa: F401 (a fixture)
    softhsm,  # noqa: F401 (a fixture)
)
from integration.test_rollover import _cacerts as cacerts


def crl_of(server: EstServer, ca: str, directory: Path) -> x509.CertificateRevocationList:
    """``<crl url>/<ca>.crl`` as the server publishes it; OpenSSL checks its signature
    against the CA's certificate."""
    with urllib.request.urlopen(f"{server.crl_url}/{ca}.crl", timeout=10) as reply:
        der = reply.read()
    path = directory / f"{ca}.crl"
    path.write_bytes(der)
    checked = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-in", path, "-noout", "-verify",
         "-CAfile", server.data_dir / "ca" / f"{ca}.pem"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr, (
        f"{ca}.crl: {checked.stdout}{checked.stderr}"
    )
    return x509.load_der_x509_crl(der)


def test_a_device_reenrolls_from_the_old_token_ca_into_the_new_one(
    hsm_server: EstServer,  # noqa: F811 (the fixture)
    device_id: str,
    tmp_path: Path,
) -> None:
    server = hsm_server
    server.start("--workers", "2")
    bootstrap = bootstrap_device(server, device_id, tmp_path / "bootstrap")

    rotated = server.cli("ca", "rotate", "devices", "--issues-from", "1h")
    assert "devices-2 CA: created ca/devices-2.pem (new key label 'devices-2'" in rotated.stdout
    server.stop()  # restart() would start one worker
    server.start("--workers", "2")
    old_ca, new_ca, root = (ca_cert(server.data_dir, n) for n in ("devices", "devices-2", "root"))

    # Before the switch: devices issues, /cacerts answers its chain.
    operational = enroll_operational(server, device_id, bootstrap, tmp_path / "operational")
    assert operational.cert.issuer == old_ca.subject
    assert_verifies(server, "devices", operational.cert_path)
    assert set(cacerts(server)) == {old_ca, root}

    # The operator brings the switch forward (every node restarted with it): no waiting
    # on the clock, which a loaded machine could outrun before the first enrollment.
    switch = dt.datetime.now(dt.UTC).replace(microsecond=0)
    set_config(
        server.data_dir, "cas.devices-2", "issues_from", switch.strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    server.stop()
    server.start("--workers", "2")
    # After it: the old generation's certificate authenticates, devices-2 issues.
    key = new_key()
    with http(server.root_pem, operational) as client:
        response = post_csr(client, f"{server.url}/simplereenroll", csr_der(key, device_id))
    renewed = Identity.write(tmp_path / "renewed", key, issued_cert(response))
    assert renewed.cert.issuer == new_ca.subject
    assert_verifies(server, "devices-2", renewed.cert_path)
    assert set(cacerts(server)) == {new_ca, root}

    # Each generation's CRL, signed in the token: a revoked old certificate is on the
    # old generation's only.
    server.cli("cert", "revoke", f"{operational.cert.serial_number:x}")
    old_crl = crl_of(server, "devices", tmp_path)
    new_crl = crl_of(server, "devices-2", tmp_path)
    assert old_crl.issuer == old_ca.subject and new_crl.issuer == new_ca.subject
    assert old_crl.get_revoked_certificate_by_serial_number(operational.cert.serial_number)
    assert new_crl.get_revoked_certificate_by_serial_number(operational.cert.serial_number) is None

    # Nothing on disk could sign as a CA, the new generation included.
    assert private_key_files(server.data_dir) == ["audit/checkpoint.key", "tls/server.key"]
    assert server.log_path is not None
    log = server.log_path.read_text()  # three starts, two workers each: none failed to sign
    assert "Started server process" in log and "cannot sign" not in log
