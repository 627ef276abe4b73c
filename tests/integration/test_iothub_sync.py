"""IoT Hub registry sync, end to end: a real ``estkit server run`` with ``[iothub]``
pointing at the registry stand-in (tests/registrystandin.py), and the operator's
commands. A device the operator disables or decommissions is disabled at the hub
within seconds, also across a server restart and a hub outage; enabling sets it back;
provisioning creates the identity; ``estkit iothub sync`` reports and replays; the
policy key never shows in a log. On both backends.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends import server_database
from estserver import EstServer, make_server, run_estkit
from registrystandin import RegistryStandIn, running_standin
from serverdb import rows

# "Within seconds": the sender looks for due changes every second.
WITHIN = 10.0


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryStandIn]:
    with running_standin(tmp_path / "registry") as standin:
        yield standin


def _with_iothub(
    server: EstServer, registry: RegistryStandIn, *, create_identities: bool = False
) -> EstServer:
    key_file = registry.write_key_file(server.data_dir / "iothub.key")
    settings = registry.config(key_file, create_identities=create_identities)
    with (server.data_dir / "estkit.toml").open("a") as config:
        config.write("\n[iothub]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    return server


@pytest.fixture
def hub_server(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, registry: RegistryStandIn
) -> Iterator[EstServer]:
    """A server syncing to the stand-in (create_identities off), not started yet."""
    server = make_server(tmp_path, database_url=server_database(request, backend))
    _with_iothub(server, registry)
    try:
        yield server
    finally:
        server.stop()


def _secrets_seen(registry: RegistryStandIn) -> list[str]:
    """The key and every signature the stand-in received, as sent and decoded."""
    signatures = [
        (s.authorization or "").split("sig=")[1].split("&")[0]
        for s in registry.requests()
        if s.authorization and "sig=" in s.authorization
    ]
    return [registry.key_b64, *signatures, *(urllib.parse.unquote(s) for s in signatures)]


def _assert_no_secret(text: str, registry: RegistryStandIn) -> None:
    assert not [s for s in _secrets_seen(registry) if s in text]
    assert "SharedAccessSignature" not in text


def test_status_changes_reach_the_hub_within_seconds(
    hub_server: EstServer, registry: RegistryStandIn, device_id: str
) -> None:
    registry.add_device(device_id, auth="certificateAuthority")
    hub_server.start()
    hub_server.cli("device", "add", device_id)
    for action, status in (("disable", "disabled"), ("enable", "enabled")):
        hub_server.cli("device", action, device_id)
        assert registry.wait_for_status(device_id, status, timeout=WITHIN) < WITHIN
    hub_server.cli("device", "decommission", device_id)
    registry.wait_for_status(device_id, "disabled", timeout=WITHIN)
    writes = [s for s in registry.requests(device_id) if s.method == "PUT"]
    assert [w.body["status"] for w in writes if w.body] == ["disabled", "enabled", "disabled"]
    assert all(w.if_match and w.if_match.startswith('"') for w in writes)
    assert writes[-1].body and writes[-1].body["statusReason"] == "estkit: device-decommission"
    _assert_no_secret(hub_server.log(), registry)


def test_a_change_made_while_the_server_is_down_arrives_when_it_starts(
    hub_server: EstServer, registry: RegistryStandIn, device_id: str
) -> None:
    registry.add_device(device_id)
    hub_server.cli("device", "add", device_id)
    hub_server.cli("device", "decommission", device_id)  # no server is running
    assert registry.requests(device_id) == []
    hub_server.start()
    registry.wait_for_status(device_id, "disabled", timeout=WITHIN)


def test_a_change_the_hub_could_not_take_survives_a_restart(
    hub_server: EstServer, registry: RegistryStandIn, device_id: str
) -> None:
    registry.add_device(device_id)
    hub_server.start()
    hub_server.cli("device", "add", device_id)
    registry.fail_next(10_000, status=503)  # the hub is down
    hub_server.cli("device", "decommission", device_id)
    deadline = time.monotonic() + WITHIN
    while not registry.requests(device_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert registry.requests(device_id)[0].status == 503
    hub_server.stop()
    [(state, attempts, error)] = rows(
        hub_server.data_dir,
        "SELECT state, attempts, last_error FROM hub_outbox WHERE device_id = :d",
        d=device_id,
    )
    assert (state, attempts >= 1) == ("pending", True)
    assert "503" in error
    registry.clear_failures()  # the hub is back
    assert registry.status(device_id) == "enabled"
    hub_server.start()
    registry.wait_for_status(device_id, "disabled", timeout=WITHIN)
    _assert_no_secret(hub_server.log() + error, registry)


def test_provisioning_creates_the_identity_with_ca_authentication(
    request: pytest.FixtureRequest,
    backend: str,
    tmp_path: Path,
    registry: RegistryStandIn,
    device_id: str,
) -> None:
    server = _with_iothub(
        make_server(tmp_path, database_url=server_database(request, backend)),
        registry,
        create_identities=True,
    )
    try:
        server.start()
        server.cli("device", "bootstrap", device_id, "--out", tmp_path / "factory")
        registry.wait_for_status(device_id, "enabled", timeout=WITHIN)
        identity = registry.devices[device_id]
        assert identity["authentication"]["type"] == "certificateAuthority"
        create = registry.requests(device_id)[-1]
        assert (create.method, create.if_match) == ("PUT", None)
        server.cli("device", "add", f"{device_id}-2")  # registering creates it too
        registry.wait_for_status(f"{device_id}-2", "enabled", timeout=WITHIN)
    finally:
        server.stop()


def _sync(server: EstServer, *args: str, verbose: bool = False) -> tuple[int, str]:
    loud = ["-v"] if verbose else []
    proc = run_estkit(*loud, "iothub", "sync", "--data-dir", server.data_dir, *args, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_iothub_sync_reports_the_backlog_and_replays_it(
    hub_server: EstServer, registry: RegistryStandIn, device_id: str
) -> None:
    """No server runs: the command alone sends what is pending."""
    known, unknown = device_id, f"{device_id}-unknown"
    registry.add_device(known)
    for dev in (known, unknown):
        hub_server.cli("device", "add", dev)
        hub_server.cli("device", "disable", dev)
    # Enabled again: an identity the hub lacks (a disable of one would hold already).
    hub_server.cli("device", "enable", unknown)

    status, out = _sync(hub_server, "--dry-run")
    assert status == 75, out
    assert "2 pending" in out and "last success: none yet" in out
    assert registry.requests() == []

    registry.fail_next(2, status=503)  # the first attempt of each fails for now
    status, out = _sync(hub_server)
    assert status == 75, out
    assert out.count("not sent, retried from") == 2

    status, out = _sync(hub_server, verbose=True)  # debug logging of every request too
    assert status == 1, out  # the unknown device is refused for good
    assert f"{known} disabled (device-disable): sent (updated)" in out
    assert f"{unknown} enabled (device-enable): failed:" in out
    assert "create_identities is off" in out
    assert registry.status(known) == "disabled"
    _assert_no_secret(out, registry)

    status, out = _sync(hub_server, "--dry-run")
    assert status == 1, out
    [failed] = [line for line in out.splitlines() if line.startswith("failed:")]
    assert f" {unknown} enabled" in failed and "create_identities is off" in failed
    [last] = [line for line in out.splitlines() if line.startswith("last success:")]
    assert f" {known} disabled" in last

    registry.add_device(unknown, status="disabled")  # the operator fixes the cause
    status, out = _sync(hub_server, "--json")
    assert status == 1, out  # failed ones wait for --retry-failed
    report = json.loads(out)
    assert report["before"]["failed_count"] == 1 and report["sent"] == []

    status, out = _sync(hub_server, "--retry-failed", "--json")
    assert status == 0, out
    report = json.loads(out)
    assert [(s["device_id"], s["result"], s["detail"]) for s in report["sent"]] == [
        (unknown, "sent", "updated")
    ]
    assert report["after"] == {
        "pending": 0,
        "oldest_pending": None,
        "failed_count": 0,
        "failed": [],
        "last_success": report["after"]["last_success"],
    }
    assert report["after"]["last_success"]["device_id"] == unknown
    assert registry.status(unknown) == "enabled"


def test_iothub_sync_needs_an_iothub_section(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    proc = server.cli("iothub", "sync", check=False)
    assert proc.returncode == 78
    assert "no [iothub] section" in proc.stderr


@pytest.mark.parametrize(
    ("mode", "content", "why"),
    [
        (0o644, None, "has mode 0644; only its owner may read"),
        (0o600, "not base64!", "expected the policy's key, in base64"),
    ],
    ids=["fail/readable-by-others", "fail/not-a-key"],
)
def test_the_server_refuses_to_start_with_an_unusable_key_file(
    tmp_path: Path, registry: RegistryStandIn, mode: int, content: str | None, why: str
) -> None:
    server = _with_iothub(make_server(tmp_path), registry)
    key_file = server.data_dir / "iothub.key"
    if content is not None:
        key_file.write_text(content)
    key_file.chmod(mode)
    proc = run_estkit("server", "run", "--data-dir", server.data_dir, check=False, timeout=60)
    assert proc.returncode == 78, proc.stderr
    assert "iothub.policy_key_file" in proc.stderr and why in proc.stderr
    assert registry.key_b64 not in proc.stderr
