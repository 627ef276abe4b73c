"""An operator-supplied issuing CA through a real server: one that may not sign
certificates stops ``server run`` (exit 78, one line naming it); one with name
constraints issues inside them, as ``openssl verify`` confirms, and refuses outside
them with ``name-constraints``."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from ca.test_constraints import DNS, make_ca, openssl_verify, permitted, without
from estkit.ca.authority import IssuingCa
from estkit.pki.certs import certs_to_pem, load_pem_certificates
from estkit.pki.keys import key_to_pem, load_private_key_pem
from estserver import make_server, run_estkit, set_config
from estutil import csr_der, http, issued_cert, new_key, post_csr


def install(data_dir: Path, ca: IssuingCa) -> None:
    """The operator's CA as ``[cas.devices]``: its certificate and key in files."""
    directory = data_dir / "operator"
    directory.mkdir(exist_ok=True)
    (directory / "devices.pem").write_bytes(certs_to_pem([ca.cert]))
    key = directory / "devices.key"
    key.write_bytes(key_to_pem(ca.key))
    key.chmod(0o600)
    set_config(data_dir, "cas.devices", "cert", '"operator/devices.pem"')
    set_config(data_dir, "cas.devices", "key", '"operator/devices.key"')


def test_an_operator_ca_is_checked_at_start_and_its_name_constraints_before_signing(
    tmp_path: Path,
) -> None:
    server = make_server(tmp_path)
    ca_dir = server.data_dir / "ca"
    root_cert = load_pem_certificates((ca_dir / "root.pem").read_bytes())[0]
    root = IssuingCa(
        name="root",
        cert=root_cert,
        key=load_private_key_pem((ca_dir / "root.key").read_bytes()),
        chain=(root_cert,),
    )
    constraints = permitted(DNS(".devices.example"))

    install(server.data_dir, make_ca("Acme Devices CA", root, usage=without(key_cert_sign=False)))
    proc = run_estkit("server", "run", "--data-dir", server.data_dir, check=False)
    assert proc.returncode == 78, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "CA 'devices'" in line and "keyCertSign" in line

    operator_ca = make_ca("Acme Devices CA", root, constraints=constraints)
    install(server.data_dir, operator_ca)
    server.start()
    try:
        with http(server.root_pem) as client:
            replies = {}
            for device_id, dns in [
                ("dev-in", "in.devices.example"),
                ("dev-out", "x.other.example"),
            ]:
                secret = server.cli("device", "add", device_id).stdout.strip()
                replies[device_id] = post_csr(
                    client,
                    f"{server.url}/simpleenroll",
                    csr_der(new_key(), device_id, sans=[DNS(dns)]),
                    auth=(device_id, secret),
                )
    finally:
        server.stop()
    issued = issued_cert(replies["dev-in"])
    verified = openssl_verify(tmp_path, operator_ca.chain, issued, at=dt.datetime.now(dt.UTC))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    refused = replies["dev-out"]
    assert refused.status_code == 403
    assert refused.headers["estkit-refusal-code"] == "name-constraints"
    assert "'x.other.example' is outside the name constraints" in refused.text
