"""Issuing-CA rollover end to end (README "Rotating an issuing CA"): `estkit ca rotate`
on a running fleet, the IoT Hub runbook on the hub stand-in, and a device that the
agent takes from the old CA to the new one with no failed renewal."""

from __future__ import annotations

import base64
import datetime as dt
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from agentutil import AgentProcess, setup_agent, wait_until
from backends import server_database
from estkit.pki.certs import load_pem_certificates, serial_hex
from estkit.pki.cms import decode_certs_only
from estserver import EstServer, make_server
from estutil import audit_rows, http
from hubstandin import Observer, make_hub_standin

VALIDITY = 6  # seconds: at fraction 0.6 the agent renews about every 3.6 s
# From the restart to the switch: the agent enrolls and renews from the old CA first.
SWITCH_AFTER = 20


@pytest.fixture
def server(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[EstServer]:
    made = make_server(
        tmp_path,
        config={("profiles.operational", "validity"): f'"{VALIDITY}s"'},
        database_url=server_database(request, backend),
    )
    made.start()
    try:
        yield made
    finally:
        made.stop()


def _pem(path: Path) -> x509.Certificate:
    return load_pem_certificates(path.read_bytes())[0]


def _cacerts(server: EstServer) -> list[x509.Certificate]:
    with http(server.root_pem) as client:
        answer = client.get(f"{server.url}/cacerts")
    assert answer.status_code == 200, answer.text
    return decode_certs_only(base64.b64decode(answer.content))


def _crl(server: EstServer, ca: str) -> x509.CertificateRevocationList:
    answer = httpx.get(f"{server.crl_url}/{ca}.crl", timeout=10)
    assert answer.status_code == 200, f"{ca}.crl: {answer.status_code}"
    return x509.load_der_x509_crl(answer.content)


def test_a_device_moves_from_the_old_devices_ca_to_the_new_one_without_a_failed_renewal(
    server: EstServer, device_id: str, tmp_path: Path
) -> None:
    ca_dir = server.data_dir / "ca"
    # A second device, bootstrapped by the old bootstrap CA, enrolls after the switch.
    late = setup_agent(server, f"{device_id}-late", tmp_path / "late")
    # From here to the agent's start, as little as can be: it enrolls before the switch.
    switch = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=SWITCH_AFTER)
    rotated = server.cli("ca", "rotate", "devices", "--issues-from", switch.isoformat())
    assert "devices-2 CA: created" in rotated.stdout, rotated.stdout
    server.cli("ca", "rotate", "bootstrap", "--issues-from", switch.isoformat())
    old_ca, new_ca = _pem(ca_dir / "devices.pem"), _pem(ca_dir / "devices-2.pem")
    # The runbook: the hub has the new CA before the switch (its proof: below).
    hub = make_hub_standin(
        tmp_path / "hub", server_data_dir=server.data_dir, verified_cas=("devices", "devices-2")
    )
    hub.start()
    observer = Observer.connect(hub.observer_port)
    issued_dir = tmp_path / "issued"
    issued_dir.mkdir()
    hook = [
        "sh", "-c",
        f'cp "$ESTKIT_CERT" "{issued_dir}/$ESTKIT_VERSION.pem"; '
        f'cp "$ESTKIT_CHAIN" "{issued_dir}/$ESTKIT_VERSION.chain"',
    ]  # fmt: skip
    setup = setup_agent(
        server, device_id, tmp_path / "dev", hub=hub, hooks=[hook], renewal={"fraction": "0.6"}
    )
    server.restart()  # every node, before the switch
    agent: AgentProcess | None = None
    try:
        agent = AgentProcess(setup).start()
        root = _pem(server.root_pem)
        assert set(_cacerts(server)) == {old_ca, root}  # until the switch
        assert new_ca.subject != old_ca.subject and new_ca.issuer == old_ca.issuer

        # Proof of possession of the new CA's key, as the hub asks for it.
        proof = tmp_path / "verify.pem"
        server.cli("ca", "iothub-verify", "--ca", "devices-2", "--code", "A1B2C3", "--out", proof)
        assert _pem(proof).subject.rfc4514_string() == "CN=A1B2C3"
        for anchor, ok in ((ca_dir / "devices-2.pem", True), (ca_dir / "devices.pem", False)):
            checked = subprocess.run(
                ["openssl", "verify", "-partial_chain", "-CAfile", anchor, proof],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert (checked.returncode == 0) is ok, checked.stdout + checked.stderr

        def new_ones() -> list[x509.Certificate]:
            certs = [_pem(p) for p in issued_dir.glob("*.pem")]
            return [c for c in certs if c.issuer == new_ca.subject]

        wait_until(
            lambda: len(new_ones()) >= 2,
            timeout=SWITCH_AFTER + 40,
            what=f"two renewals from devices-2:\n{agent.log()}",
        )
        first_new = min(new_ones(), key=lambda c: c.not_valid_before_utc)
        observer.wait_for(
            lambda m: (
                m.device_id == device_id
                and m.properties.get("certSerial") == serial_hex(first_new.serial_number)
            ),
            timeout=20,
        )
        assert set(_cacerts(server)) == {new_ca, root}
        token = server.cli("token", "create", "--name", "ops", "--scope", "read").stdout.strip()
        with http(server.root_pem) as client:
            listed = client.get(
                f"{server.origin}/api/v1/cas", headers={"Authorization": f"Bearer {token}"}
            ).json()
        by_name = {ca["name"]: ca for ca in listed}
        assert by_name["devices-2"]["replaces"] == "devices"
        assert [lb["name"] for lb in by_name["devices-2"]["labels"]] == ["devices"]
        assert by_name["devices"]["labels"] == []
    finally:
        status = agent.stop() if agent is not None else None
        observer.close()
        hub.stop()
    assert status == 0, agent.log() if agent else ""

    versions = sorted(int(p.stem) for p in issued_dir.glob("*.pem"))
    issued = [_pem(issued_dir / f"{n}.pem") for n in versions]
    chains = [load_pem_certificates((issued_dir / f"{n}.chain").read_bytes()) for n in versions]
    issuers = [c.issuer for c in issued]
    # Old CA first, then the new one, never back; each version carries its own CA's chain.
    assert issuers[0] == old_ca.subject
    switched = issuers.index(new_ca.subject)
    assert set(issuers[switched:]) == {new_ca.subject}
    for cert, chain in zip(issued, chains, strict=True):
        assert chain == [new_ca if cert.issuer == new_ca.subject else old_ca]
    assert issued[switched].not_valid_before_utc >= switch - dt.timedelta(minutes=5)

    # No renewal failed or was refused; the old CA's certificate renewed into the new one.
    log = agent.log() if agent else ""
    assert "refused" not in log and "failed" not in log.lower(), log
    rows = audit_rows(server.data_dir, device_id)
    assert all(outcome == "ok" for _, outcome, _ in rows), rows
    renewals = [detail for action, _, detail in rows if action == "est-simplereenroll"]
    assert any("ca=devices-2" in d for d in renewals) and any("ca=devices " in d for d in renewals)
    assert setup.status()["last_error"] is None

    # The late device's bootstrap certificate, of the old bootstrap CA, still enrolls, and
    # from devices-2; the factory's new bootstrap certificates come from bootstrap-2.
    assert (
        _pem(late.directory / "bootstrap" / "cert.pem").issuer
        == _pem(ca_dir / "bootstrap.pem").subject
    )
    late.renew()
    late_cert, _ = late.current()
    assert late_cert.issuer == new_ca.subject
    server.cli("device", "bootstrap", f"{device_id}-new", "--out", tmp_path / "new")
    assert _pem(tmp_path / "new" / "cert.pem").issuer == _pem(ca_dir / "bootstrap-2.pem").subject

    last_old = serial_hex(issued[switched - 1].serial_number)

    # Each CA keeps its own CRL: a revoked old certificate is on the old CA's only.
    server.cli("cert", "revoke", last_old, "--reason", "superseded")

    def listed(ca: str) -> bool:
        crl = _crl(server, ca)
        return crl.get_revoked_certificate_by_serial_number(int(last_old, 16)) is not None

    wait_until(lambda: listed("devices"), timeout=10, what="the revocation on devices.crl")
    assert not listed("devices-2")
    old_crl, new_crl = _crl(server, "devices"), _crl(server, "devices-2")
    assert old_crl.issuer == old_ca.subject and new_crl.issuer == new_ca.subject
    assert old_crl.is_signature_valid(old_ca.public_key())  # type: ignore[arg-type]
    assert new_crl.is_signature_valid(new_ca.public_key())  # type: ignore[arg-type]
