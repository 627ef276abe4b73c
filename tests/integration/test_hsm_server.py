"""A real ``estkit server run`` whose CA keys are in a PKCS#11 token (SoftHSM2).

Initialised with ``server init --signer pkcs11``, served by two worker processes, it
enrolls and re-enrolls devices and publishes CRLs, every signature made inside the
token, with no CA key file in its data directory; OpenSSL verifies what it issued.
"""

from __future__ import annotations

import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509

from backends import server_database, sqlite_only
from estserver import EstServer, make_server, run_estkit, set_config
from estutil import Identity, csr_der, http, issued_cert, new_key, openssl_verify, post_csr
from integration.conftest import bootstrap_device, enroll_operational
from softhsm import SoftHsm, make_softhsm


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHsm:
    """A token of this test's own; the server and the operator commands find it through
    ``SOFTHSM2_CONF``, set in this process's environment, which they inherit."""
    return make_softhsm(tmp_path / "softhsm", monkeypatch)


@pytest.fixture
def hsm_server(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, softhsm: SoftHsm
) -> EstServer:
    """A server (not started) whose CA keys ``server init`` made in ``softhsm``."""
    hsm = softhsm
    server = make_server(
        tmp_path,
        database_url=server_database(request, backend),
        init_args=[
            "--signer", "pkcs11", "--pkcs11-module", str(hsm.module),
            "--token-label", hsm.label, "--pin-file", str(hsm.pin_file),
        ],
    )  # fmt: skip
    request.addfinalizer(server.stop)
    return server


def assert_verifies(server: EstServer, issuing_ca: str, cert: Path) -> None:
    proc = openssl_verify(server.root_pem, server.data_dir / "ca" / f"{issuing_ca}.pem", cert)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(": OK"), proc.stdout + proc.stderr


@sqlite_only
def test_a_server_with_its_ca_keys_in_a_token_enrolls_reenrolls_and_signs_crls(
    hsm_server: EstServer, device_id: str, tmp_path: Path
) -> None:
    """SQLite only: the token is what is under test, and the store is the same either way."""
    server = hsm_server
    server.start("--workers", "2")

    bootstrap = bootstrap_device(server, device_id, tmp_path / "bootstrap")
    assert_verifies(server, "bootstrap", bootstrap.cert_path)
    operational = enroll_operational(server, device_id, bootstrap, tmp_path / "operational")
    assert_verifies(server, "devices", operational.cert_path)
    key = new_key()
    with http(server.root_pem, operational) as client:
        response = post_csr(client, f"{server.url}/simplereenroll", csr_der(key, device_id))
    renewed = Identity.write(tmp_path / "renewed", key, issued_cert(response))
    assert_verifies(server, "devices", renewed.cert_path)
    assert renewed.cert.serial_number != operational.cert.serial_number

    # Devices enrolling at once, over both workers, each signing in its own session.
    others = [f"{device_id}-{n}" for n in range(3)]
    identities = [bootstrap_device(server, d, tmp_path / d / "bootstrap") for d in others]
    with ThreadPoolExecutor(len(others)) as pool:
        enrolled = list(
            pool.map(
                lambda pair: enroll_operational(server, *pair, tmp_path / pair[0] / "op"),
                zip(others, identities, strict=True),
            )
        )
    for identity in enrolled:
        assert_verifies(server, "devices", identity.cert_path)

    # A revocation (the operator command signs the new CRL in the token too), then the
    # CRL as the server's CRL endpoint serves it, checked against the devices CA by OpenSSL.
    server.cli("cert", "revoke", f"{operational.cert.serial_number:x}")
    with urllib.request.urlopen(f"{server.crl_url}/devices.crl", timeout=10) as reply:
        crl_der = reply.read()
    crl_path = tmp_path / "devices.crl"
    crl_path.write_bytes(crl_der)
    checked = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-in", crl_path, "-noout", "-verify",
         "-CAfile", server.data_dir / "ca" / "devices.pem"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr, (
        checked.stdout + checked.stderr
    )
    crl = x509.load_der_x509_crl(crl_der)
    assert crl.get_revoked_certificate_by_serial_number(operational.cert.serial_number)
    assert crl.get_revoked_certificate_by_serial_number(renewed.cert.serial_number) is None

    # Nothing on disk could sign as a CA: the private keys there are the TLS server's and
    # the audit key (which signs audit checkpoints only).
    key_files = sorted(
        str(p.relative_to(server.data_dir))
        for p in server.data_dir.rglob("*")
        if p.is_file() and b"PRIVATE KEY-----" in p.read_bytes()
    )
    assert key_files == ["audit/checkpoint.key", "tls/server.key"]
    log = server.log()
    assert log.count("Started server process") == 2 and "cannot sign" not in log


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (("pin", "0000"), "CA 'root': token '{token}' refused the PIN (PinIncorrect)"),
        (("key_label", '"no-such-key"'), "CA 'devices': key label 'no-such-key' in token"),
        (("token_label", '"no-such-token"'), "CA 'devices': no token labelled 'no-such-token'"),
    ],
    ids=["fail/wrong-pin", "fail/no-such-key", "fail/no-such-token"],
)
@sqlite_only
def test_a_token_setting_that_does_not_work_stops_the_server_in_one_line(
    hsm_server: EstServer, softhsm: SoftHsm, setting: tuple[str, str], message: str
) -> None:
    """SQLite only: the server stops before it serves, whatever its store."""
    key, value = setting
    if key == "pin":
        softhsm.pin_file.write_text(value + "\n")
    else:
        set_config(hsm_server.data_dir, "cas.devices", key, value)
    proc = run_estkit("server", "run", "--data-dir", hsm_server.data_dir, check=False)
    assert proc.returncode == 78, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message.format(token=softhsm.label) in lines[0], proc.stderr
