"""Faults around a renewal, with real processes: the server going away mid-renewal, the
agent killed at each step of a certificate swap, failing hooks."""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from agentutil import AgentProcess, setup_agent, wait_until
from backends import server_database
from estkit.agent import PAUSE_STEPS
from estkit.pki.certs import fingerprint, serial_hex
from estserver import EstServer, make_server, run_estkit, set_config


@pytest.fixture(scope="module")
def long_server(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EstServer]:
    """Certificates of 60 s: nothing falls due by itself during these tests."""
    server = make_server(
        tmp_path_factory.mktemp("est-long"),
        config={("profiles.operational", "validity"): '"60s"'},
        database_url=server_database(request, backend),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_server_outage_keeps_the_old_certificate_and_renews_when_it_is_back(
    fresh_server: EstServer, device_id: str, tmp_path: Path
) -> None:
    set_config(fresh_server.data_dir, "profiles.operational", "validity", '"30s"')
    fresh_server.start()
    # Due at 30 % of 33 s (30 s + 3 s back-dating): about 7 s after issue.
    setup = setup_agent(
        fresh_server,
        device_id,
        tmp_path / "dev",
        renewal={"fraction": "0.3", "jitter": "0", "retry_min": '"0.5s"', "retry_max": '"2s"'},
    )
    setup.renew()
    first, _ = setup.current()
    agent = AgentProcess(setup).start()
    try:
        wait_until(lambda: "agent for" in agent.log(), timeout=15, what="agent start")
        fresh_server.stop()
        down_at = time.monotonic()
        wait_until(
            lambda: setup.status().get("failures", 0) >= 3,
            timeout=30,
            what=f"three failed attempts:\n{agent.log()}",
        )
        status = setup.status()
        assert setup.current()[0] == first, "the old certificate must stay in place"
        assert status["certificate"]["serial"] == serial_hex(first.serial_number)
        assert "simplereenroll" in status["last_error"]["message"]
        fresh_server.start()
        outage = time.monotonic() - down_at
        wait_until(
            lambda: setup.current()[0].serial_number != first.serial_number,
            timeout=20,
            what=f"renewal after the server came back:\n{agent.log()}",
        )
    finally:
        code = agent.stop()
    assert code == 0
    log = agent.log()
    failures = len(re.findall(r"renewal failed \(\d+ in a row\)", log))
    # Backoff, not a tight loop: 0.5 s doubling to a 2 s cap.
    assert 3 <= failures <= 3 + outage / 2, (failures, outage, log)
    status = setup.status()
    assert status["last_error"] is None and status["failures"] == 0
    assert status["last_renewal"]["authenticated_with"] == "operational"


@pytest.mark.parametrize("step", PAUSE_STEPS)
def test_agent_killed_at_each_step_of_a_swap_always_leaves_a_working_certificate(
    long_server: EstServer, device_id: str, tmp_path: Path, step: str
) -> None:
    setup = setup_agent(long_server, device_id, tmp_path / "dev")
    setup.renew()
    before, _ = setup.current()

    crashing = AgentProcess(
        setup, env={"ESTKIT_AGENT_PAUSE_AT": step}, command=("renew", "--force")
    ).start()
    try:
        crashing.wait_stopped_by_signal(timeout=30)
    finally:
        crashing.kill()

    # What any reader of current/ sees right after the crash: a matching pair (asserted
    # inside current()), the old one until the link has moved, the new one after.
    seen, _ = setup.current()
    moved = PAUSE_STEPS.index(step) >= PAUSE_STEPS.index("link-renamed")
    assert (seen.serial_number != before.serial_number) == moved

    # Restarted, the agent repairs the directory and finishes the interrupted swap.
    result = setup.renew()
    assert result.stdout.startswith("not due"), result.stdout
    after, _ = setup.current()
    assert after.serial_number != before.serial_number
    assert setup.versions() == ["1", "2"]
    leftovers = [n for n in os.listdir(setup.state_dir) if n.startswith(".")]
    assert leftovers == []
    current = setup.state_dir / "current"
    assert os.readlink(current) == "archive/2"
    assert stat.S_IMODE((current / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((setup.state_dir / "archive" / "2").stat().st_mode) == 0o700
    # And the certificate works: the EST server authenticates the device with it.
    health = run_estkit(
        "health",
        "--url",
        long_server.url,
        "--trust-anchor",
        long_server.root_pem,
        "--cert",
        current / "fullchain.pem",
        "--key",
        current / "key.pem",
    )
    assert health.stdout.startswith("-----BEGIN CERTIFICATE-----")
    assert setup.status(check=True)["certificate"]["version"] == 2


def test_renew_command_renews_only_when_due_unless_forced(
    long_server: EstServer, device_id: str, tmp_path: Path
) -> None:
    setup = setup_agent(long_server, device_id, tmp_path / "dev")
    assert setup.status()["certificate"] is None
    first = setup.renew()
    assert "simpleenroll with the bootstrap certificate" in first.stdout
    cert1, _ = setup.current()
    assert setup.renew().stdout.startswith("not due")
    assert setup.current()[0] == cert1

    forced = setup.renew("--force")
    assert "simplereenroll with the operational certificate" in forced.stdout
    cert2, _ = setup.current()
    assert cert2.serial_number != cert1.serial_number
    assert cert2.public_key() != cert1.public_key()  # rotate_key is on by default
    assert stat.S_IMODE(setup.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((setup.state_dir / "archive").stat().st_mode) == 0o700

    status = setup.status(check=True)
    assert status["certificate"]["version"] == 2 and status["certificate"]["valid"] is True
    text = run_estkit("agent", "status", "--config", setup.config).stdout
    assert f"device:        {device_id}" in text and "version 2" in text


def test_keep_key_when_rotation_is_off_and_failing_hooks_are_not_fatal(
    long_server: EstServer, device_id: str, tmp_path: Path
) -> None:
    marker = tmp_path / "hook-ran"
    setup = setup_agent(
        long_server,
        device_id,
        tmp_path / "dev",
        renewal={"rotate_key": "false"},
        hooks=[
            ["false"],
            ["/nonexistent/hook"],
            ["sh", "-c", f'echo "$ESTKIT_DEVICE_ID $ESTKIT_SERIAL $ESTKIT_KEY" > {marker}'],
        ],
    )
    setup.renew()
    cert1, _ = setup.current()
    setup.renew("--force")
    cert2, _ = setup.current()
    assert cert2.serial_number != cert1.serial_number
    assert cert2.public_key() == cert1.public_key()
    device, serial, key_path = marker.read_text().split()
    assert device == device_id and int(serial, 16) == cert2.serial_number
    assert key_path == str(setup.state_dir / "current" / "key.pem")
    failed = setup.status()["last_hooks"]
    assert failed == {"at": failed["at"], "ok": 1, "failed": failed["failed"]}
    assert any("exit status 1" in f for f in failed["failed"])
    assert any("cannot run" in f for f in failed["failed"])


def _pending_rows(server: EstServer, device_id: str) -> list[list[str]]:
    out = server.cli("pending", "list", "--all").stdout
    return [r for r in (line.split("\t") for line in out.splitlines() if line) if r[3] == device_id]


def test_enrollment_waiting_for_approval_is_retried_with_the_same_request(
    request: pytest.FixtureRequest, backend: str, device_id: str, tmp_path: Path
) -> None:
    server = make_server(
        tmp_path / "approval",
        config={
            ("labels.devices", "approval"): "true",
            ("labels.devices", "approval_retry_after"): "1",
        },
        database_url=server_database(request, backend),
    )
    server.start()
    try:
        # A 1 s request timeout: the client polls 202 for 4 s, then the agent waits
        # Retry-After and asks again, with the same CSR (approval is bound to it).
        setup = setup_agent(server, device_id, tmp_path / "dev", est_timeout="1s")
        agent = AgentProcess(setup).start()
        try:
            wait_until(
                lambda: "pending" in ((setup.status().get("last_error") or {}).get("message", "")),
                timeout=30,
                what=f"the agent to report the pending request:\n{agent.log()}",
            )
            wait_until(lambda: "asking again for pending" in agent.log(), timeout=20)
            [row] = _pending_rows(server, device_id)
            assert row[1] == "pending"
            assert (setup.state_dir / "pending.json").exists()
            server.cli("pending", "approve", row[0])
            wait_until(
                lambda: setup.status().get("certificate"),
                timeout=20,
                what=f"the certificate after approval:\n{agent.log()}",
            )
        finally:
            assert agent.stop() == 0
    finally:
        server.stop()
    [row] = _pending_rows(server, device_id)
    assert row[1] == "issued"
    assert not (setup.state_dir / "pending.json").exists()
    setup.current()


def test_trust_anchor_by_fingerprint_is_fetched_once_and_pinned(
    long_server: EstServer, device_id: str, tmp_path: Path
) -> None:
    root = x509.load_pem_x509_certificate(long_server.root_pem.read_bytes())
    setup = setup_agent(
        long_server, device_id, tmp_path / "dev", trust_fingerprint=fingerprint(root)
    )
    assert "bootstrap certificate" in setup.renew().stdout
    assert "operational certificate" in setup.renew("--force").stdout

    wrong = setup_agent(
        long_server, device_id + "-w", tmp_path / "wrong", trust_fingerprint="AB" * 32
    )
    refused = wrong.renew(check=False)
    assert refused.returncode == 1
    assert "fingerprint" in refused.stderr
    assert wrong.status()["certificate"] is None
