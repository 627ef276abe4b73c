"""The agent against a real server issuing certificates that last 6 seconds, and the hub
stand-in: renewal after renewal, decommissioning, wrong clocks, expiry while offline."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from agentutil import AgentProcess, setup_agent, wait_until
from backends import server_database
from estkit.agent import StateDirectory
from estkit.pki import keys
from estkit.pki.certs import serial_hex
from estkit.pki.profiles import Kind, Profile, issue_leaf
from estserver import EstServer, make_server
from estutil import audit_rows
from hubstandin import HubStandIn, Observer, Received, make_hub_standin

VALIDITY = 6  # seconds: at fraction 0.6, a renewal every ~3.5 s


@pytest.fixture(scope="module")
def short_server(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EstServer]:
    server = make_server(
        tmp_path_factory.mktemp("est-short"),
        config={("profiles.operational", "validity"): f'"{VALIDITY}s"'},
        database_url=server_database(request, backend),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, short_server: EstServer) -> Iterator[HubStandIn]:
    standin = make_hub_standin(
        tmp_path_factory.mktemp("hub"), server_data_dir=short_server.data_dir
    )
    standin.start()
    try:
        yield standin
    finally:
        standin.stop()


@pytest.fixture
def observer(hub: HubStandIn) -> Iterator[Observer]:
    watcher = hub.observer()
    try:
        yield watcher
    finally:
        watcher.close()


def _telemetry_of(device_id: str) -> Callable[[Received], bool]:
    def match(m: Received) -> bool:
        return m.device_id == device_id and "/messages/events/" in m.topic

    return match


def test_agent_renews_again_and_again_with_new_keys_and_reconnects_to_the_hub(
    short_server: EstServer, hub: HubStandIn, observer: Observer, device_id: str, tmp_path: Path
) -> None:
    issued_dir = tmp_path / "issued"
    issued_dir.mkdir()
    hook = ["sh", "-c", f'cp "$ESTKIT_CERT" "{issued_dir}/$ESTKIT_VERSION.pem"']
    # Renewing at 60 % leaves 2.5 s before expiry: ample even on a loaded machine.
    setup = setup_agent(
        short_server,
        device_id,
        tmp_path / "dev",
        hub=hub,
        hooks=[hook],
        renewal={"fraction": "0.6"},
    )
    agent = AgentProcess(setup).start()
    try:
        wait_until(
            lambda: len(os.listdir(issued_dir)) >= 4,
            timeout=45,
            what=f"first enrollment and three renewals:\n{agent.log()}",
        )
        issued = {
            int(p.stem): x509.load_pem_x509_certificate(p.read_bytes())
            for p in issued_dir.glob("*.pem")
        }
        # After every swap the device reconnects with the new certificate and sends on.
        for number in sorted(issued)[:4]:
            serial = serial_hex(issued[number].serial_number)
            observer.wait_for(
                lambda m, s=serial: (
                    m.device_id == device_id and m.properties.get("certSerial") == s
                ),
                timeout=15,
            )
        # The device's cloud-to-device subscription works on the current connection.
        observer.publish(f"devices/{device_id}/messages/devicebound/%24.to=test", b"ping")
        wait_until(
            lambda: "cloud-to-device message" in agent.log(),
            timeout=10,
            what="the agent to receive a cloud-to-device message",
        )
        twins = observer.matching(lambda m: m.topic.startswith("$iothub/twin/PATCH/"))
    finally:
        status_code = agent.stop()
    assert status_code == 0, agent.log()

    certs = [issued[n] for n in sorted(issued)]
    assert len({serial_hex(c.serial_number) for c in certs}) == len(certs)
    for older, newer in itertools.pairwise(certs):
        assert not keys.public_keys_match(older.public_key(), newer.public_key()), "key reused"
        assert newer.not_valid_before_utc >= older.not_valid_before_utc
    assert {c.subject.rfc4514_string() for c in certs} == {f"CN={device_id}"}

    # Queued telemetry survives the reconnects: no sequence number is missing.
    seqs = sorted({m.json()["seq"] for m in observer.matching(_telemetry_of(device_id))})
    assert seqs == list(range(1, seqs[-1] + 1)), seqs
    # Each connection reported the certificate's validity as twin reported properties.
    for cert in certs[:4]:
        assert any(serial_hex(cert.serial_number).encode() in m.payload for m in twins)

    status = setup.status()
    assert status["last_renewal"]["operation"] == "simplereenroll"
    assert status["last_renewal"]["authenticated_with"] == "operational"
    assert status["last_error"] is None and status["running"] is False
    # Old versions are pruned once a newer one has worked; the previous one is kept.
    assert 2 <= len(setup.versions()) <= 3
    current, _ = setup.current()
    assert status["certificate"]["serial"] == serial_hex(current.serial_number)


def test_decommissioned_device_stops_renewing_and_says_why(
    short_server: EstServer, hub: HubStandIn, device_id: str, tmp_path: Path
) -> None:
    setup = setup_agent(
        short_server, device_id, tmp_path / "dev", hub=hub, renewal={"fraction": "0.6"}
    )
    agent = AgentProcess(setup).start()
    try:
        wait_until(
            lambda: (setup.status().get("hub") or {}).get("connected"),
            timeout=20,
            what=f"the agent to enroll and connect:\n{agent.log()}",
        )
        short_server.cli("device", "revoke", device_id)
        exit_code = agent.wait_exit(timeout=VALIDITY * 3)
    finally:
        agent.ensure_stopped()
    assert exit_code == 77, agent.log()
    assert (
        f"ERROR estkit.agent.daemon: EST server refused device {device_id} for good "
        "(decommissioned): " in agent.log()
    )
    status = setup.status()
    assert status["state"] == "refused"
    assert "decommissioned" in status["refused"]["reason"]
    assert status["refused"]["code"] == "decommissioned"
    assert status["hub"]["connected"] is False  # it hung up on its way out

    # Restarted (as a service manager might), it asks once and stops again: no loop.
    attempts = len(audit_rows(short_server.data_dir, device_id))
    again = AgentProcess(setup).start()
    try:
        assert again.wait_exit(timeout=20) == 77
    finally:
        again.ensure_stopped()
    assert len(audit_rows(short_server.data_dir, device_id)) - attempts <= 2
    text = setup.renew(check=False)
    assert text.returncode == 77 and "decommissioned" in text.stderr


def test_agent_refuses_to_act_on_a_clock_before_the_certificate(
    short_server: EstServer, device_id: str, tmp_path: Path
) -> None:
    setup = setup_agent(short_server, device_id, tmp_path / "dev")
    setup.renew()
    first, _ = setup.current()
    early = {"ESTKIT_AGENT_CLOCK_OFFSET": "-3600"}

    forced = setup.renew("--force", env=early, check=False)
    assert forced.returncode == 1
    assert "clock" in forced.stderr and "notBefore" in forced.stderr

    agent = AgentProcess(setup, env=early).start()
    try:
        wait_until(
            lambda: setup.status().get("state") == "clock-refused",
            timeout=15,
            what=f"the agent to report the clock:\n{agent.log()}",
        )
        # Past the certificate's real renewal time and expiry, it still did nothing.
        end = first.not_valid_after_utc + dt.timedelta(seconds=1)
        wait_until(lambda: dt.datetime.now(dt.UTC) > end, timeout=VALIDITY + 5)
        assert setup.current()[0] == first
        assert setup.versions() == ["1"]
        assert "clock" in setup.status()["last_error"]["message"]
    finally:
        assert agent.stop() == 0
    # With the clock right again, the (now expired) certificate is replaced.
    assert "bootstrap" in setup.renew().stdout


@pytest.mark.parametrize("fallback", [True, False], ids=["ok/bootstrap-fallback", "off/reported"])
def test_certificate_expired_while_offline(
    short_server: EstServer, device_id: str, tmp_path: Path, fallback: bool
) -> None:
    setup = setup_agent(
        short_server,
        device_id,
        tmp_path / "dev",
        bootstrap={"fallback": "true" if fallback else "false"},
    )
    setup.renew()  # first enrollment always uses the bootstrap certificate
    first, _ = setup.current()
    end = first.not_valid_after_utc + dt.timedelta(seconds=0.5)
    wait_until(lambda: dt.datetime.now(dt.UTC) > end, timeout=VALIDITY + 5, what="expiry")

    result = setup.renew(check=False)  # an expired certificate is always due
    if not fallback:
        assert result.returncode == 1
        assert "expired" in result.stderr and "bootstrap.fallback is off" in result.stderr
        assert setup.current()[0] == first
        return
    assert result.returncode == 0, result.stderr
    assert "simpleenroll with the bootstrap certificate" in result.stdout
    second, _ = setup.current()
    assert second.serial_number != first.serial_number
    assert second.subject == first.subject
    now = dt.datetime.now(dt.UTC)
    assert second.not_valid_before_utc <= now <= second.not_valid_after_utc


def test_certificate_unknown_to_the_server_falls_back_to_the_bootstrap_certificate(
    short_server: EstServer, device_id: str, tmp_path: Path
) -> None:
    """A certificate of the right CA that the server has no record of (a restored backup)."""
    setup = setup_agent(short_server, device_id, tmp_path / "dev")
    ca_dir = short_server.data_dir / "ca"
    issuer = x509.load_pem_x509_certificate((ca_dir / "devices.pem").read_bytes())
    issuer_key = keys.load_private_key_pem((ca_dir / "devices.key").read_bytes())
    key = keys.generate_key("ec-p256")
    stranger = issue_leaf(
        profile=Profile("op", Kind.OPERATIONAL, dt.timedelta(hours=1)),
        public_key=key.public_key(),
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]),
        sans=None,
        issuer=issuer,
        issuer_key=issuer_key,
        now=dt.datetime.now(dt.UTC),
    )
    state = StateDirectory(setup.state_dir)
    state.activate(
        state.install(key_pem=keys.key_to_pem(key), certificate=stranger, chain=[issuer])
    )

    result = setup.renew("--force")
    assert "simpleenroll with the bootstrap certificate" in result.stdout
    assert setup.current()[0].serial_number != stranger.serial_number
    reasons = [detail for _, outcome, detail in audit_rows(short_server.data_dir, device_id)]
    assert any("unknown to this CA" in r for r in reasons), reasons


def test_agent_exits_cleanly_on_sigterm_while_waiting(
    short_server: EstServer, device_id: str, tmp_path: Path
) -> None:
    setup = setup_agent(
        short_server, device_id, tmp_path / "dev", renewal={"fraction": "0.9", "jitter": "0"}
    )
    agent = AgentProcess(setup).start()
    try:
        wait_until(lambda: setup.status().get("certificate"), timeout=20, what="enrollment")
        started = time.monotonic()
    finally:
        code = agent.stop()
    assert code == 0
    assert time.monotonic() - started < 5
    status = setup.status()
    assert status["state"] == "stopped" and status["running"] is False
