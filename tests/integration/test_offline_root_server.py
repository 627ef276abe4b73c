"""A real server whose root is offline and whose issuing CAs' keys are in a PKCS#11 token.

The whole ceremony, as an operator runs it: the root is made on "its own machine" (a
directory of its own, its key in a SoftHSM2 token of its own); ``server init
--offline-root --signer pkcs11`` makes the devices and bootstrap CAs' keys in the
server's token and their requests; the root signs them and its CRL; ``ca import``
installs them; then a device bootstraps, enrolls and re-enrolls, with estkit's own
client trusting the root by fingerprint. OpenSSL verifies what was issued up to the
root, and the root's CRL the server serves; no CA key is a file in the data directory.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from estkit.pki.certs import fingerprint
from estkit.pki.cms import decode_certs_only
from estserver import EstServer, make_server, run_estkit
from estutil import Identity, assert_openssl_verifies, http
from integration.conftest import bootstrap_device
from softhsm import CONF_ENV, SoftHsm, make_softhsm

ROOT_PIN = "1234-root"


def add_token(hsm: SoftHsm, label: str, pin: str) -> Path:
    """A second token beside ``hsm``'s (the root's, "on another machine"); its PIN file."""
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
         "--so-pin", "so-4242"],
        check=True, capture_output=True, env={**os.environ, CONF_ENV: str(hsm.conf)},
    )  # fmt: skip
    pin_file = hsm.directory / f"{label}.pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pin + "\n")
    return pin_file


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        body: bytes = reply.read()
        return body


def crl_number(der: bytes) -> int:
    crl = x509.load_der_x509_crl(der)
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHsm:
    return make_softhsm(tmp_path / "softhsm", monkeypatch)


def test_a_server_with_an_offline_root_and_token_keys_enrolls_and_reenrolls(
    request: pytest.FixtureRequest,
    softhsm: SoftHsm,
    device_id: str,
    tmp_path: Path,
) -> None:
    """On the server's own SQLite file: the custody of the keys is under test, and the
    store is the same either way."""
    # The root's machine: its key in a token of its own.
    root_dir = tmp_path / "offline-root"
    root_token = f"root-{softhsm.label}"
    root_pin_file = add_token(softhsm, root_token, ROOT_PIN)
    made = run_estkit(
        "root", "init", "--dir", root_dir, "--signer", "pkcs11",
        "--pkcs11-module", softhsm.module, "--token-label", root_token,
        "--pin-file", root_pin_file,
    ).stdout  # fmt: skip
    root_fp = re.search(r"SHA-256:\s+(\S+)", made)
    assert root_fp is not None

    # The server's machine: the issuing CAs' keys in the server's token, and requests.
    server: EstServer = make_server(
        tmp_path,
        init_args=[
            "--offline-root", "--signer", "pkcs11", "--pkcs11-module", softhsm.module,
            "--token-label", softhsm.label, "--pin-file", softhsm.pin_file,
        ],
    )  # fmt: skip
    request.addfinalizer(server.stop)
    data = server.data_dir
    refused = run_estkit("server", "run", "--data-dir", data, check=False, timeout=60)
    assert refused.returncode == 78
    assert refused.stderr.startswith("estkit: offline root: not imported yet: ")
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr

    # Carried over and back; the ceremony on the root's machine.
    carried = tmp_path / "usb-stick"
    carried.mkdir()
    for name in ("devices", "bootstrap"):
        shutil.copy(data / "ca" / f"{name}.csr", carried)
        run_estkit(
            "root", "sign-ca", "--dir", root_dir, "--name", name,
            "--csr", carried / f"{name}.csr", "--out", carried / f"{name}.pem",
        )  # fmt: skip
    run_estkit("root", "crl", "--dir", root_dir, "--out", carried / "root.crl")
    shutil.copy(root_dir / "root.pem", carried)
    server.cli(
        "ca", "import", "--root", carried / "root.pem", "--root-fingerprint", root_fp.group(1),
        "--cert", f"devices={carried / 'devices.pem'}",
        "--cert", f"bootstrap={carried / 'bootstrap.pem'}",
        "--root-crl", carried / "root.crl",
    )  # fmt: skip
    root_pem = data / "ca" / "root.pem"
    assert fingerprint(x509.load_pem_x509_certificate(root_pem.read_bytes())) == root_fp.group(1)

    server.start()

    # cacerts: the devices CA and the root above it.
    with http(root_pem) as client:
        reply = client.get(f"{server.url}/cacerts")
    assert reply.status_code == 200
    chain = decode_certs_only(base64.b64decode(reply.content))
    devices_ca = x509.load_pem_x509_certificate((data / "ca" / "devices.pem").read_bytes())
    root = x509.load_pem_x509_certificate(root_pem.read_bytes())
    assert set(chain) == {devices_ca, root}

    # A device: bootstrap certificate (signed in the server's token), then enroll and
    # re-enroll with estkit's client, which trusts the root by its fingerprint only.
    boot = bootstrap_device(server, device_id, tmp_path / "bootstrap")
    checked = openssl("verify", "-CAfile", root_pem, "-untrusted", data / "ca" / "bootstrap.pem",
                      boot.cert_path)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    op = tmp_path / "operational"
    run_estkit(
        "enroll", "--url", server.url, "--device-id", device_id,
        "--fingerprint", root_fp.group(1), "--cert", boot.cert_path, "--key", boot.key_path,
        "--out", op,
    )  # fmt: skip
    assert_openssl_verifies(root_pem, op)
    first = Identity.load(op)
    renewed = tmp_path / "renewed"
    run_estkit(
        "reenroll", "--url", server.url, "--trust-anchor", root_pem,
        "--cert", op / "cert.pem", "--key", op / "key.pem", "--out", renewed,
    )  # fmt: skip
    assert_openssl_verifies(root_pem, renewed)
    second = Identity.load(renewed)
    assert second.cert.serial_number != first.cert.serial_number
    assert second.cert.subject == first.cert.subject

    # The root's CRL, as signed offline, served on the CRL listener; OpenSSL checks it.
    served = fetch(f"{server.crl_url}/root.crl")
    assert served == (carried / "root.crl").read_bytes()
    (tmp_path / "served-root.crl").write_bytes(served)
    checked = openssl("crl", "-inform", "DER", "-in", tmp_path / "served-root.crl", "-noout",
                      "-verify", "-CAfile", root_pem)  # fmt: skip
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr
    # The devices CA's own CRL is signed here, in the token, and chains to the root too.
    devices_crl = tmp_path / "devices.crl"
    devices_crl.write_bytes(fetch(f"{server.crl_url}/devices.crl"))
    checked = openssl("crl", "-inform", "DER", "-in", devices_crl, "-noout", "-verify",
                      "-CAfile", data / "ca" / "devices.pem")  # fmt: skip
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr

    # The next root CRL, imported while the server runs, is served within seconds.
    run_estkit("root", "crl", "--dir", root_dir, "--out", carried / "root-2.crl")
    server.cli("ca", "import", "--root-crl", carried / "root-2.crl")
    deadline = time.monotonic() + 15
    while crl_number(fetch(f"{server.crl_url}/root.crl")) != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fetch(f"{server.crl_url}/root.crl") == (carried / "root-2.crl").read_bytes()

    # No CA key on the server's disk: the private keys there are the TLS server's and the
    # audit key (which signs audit checkpoints only), and
    # nothing of the root's but its certificate and CRL.
    key_files = sorted(
        str(p.relative_to(data))
        for p in data.rglob("*")
        if p.is_file() and b"PRIVATE KEY-----" in p.read_bytes()
    )
    assert key_files == ["audit/checkpoint.key", "tls/server.key"]
    assert sorted(p.name for p in (data / "ca").iterdir()) == [
        "bootstrap.csr", "bootstrap.pem", "devices.csr", "devices.pem", "root.crl", "root.pem",
    ]  # fmt: skip
    assert not list(data.rglob("root.key")) and not list(root_dir.rglob("root.key"))
    log = server.log()
    assert "cannot publish the CRL of CA root" not in log and "Traceback" not in log
