"""Audit log hash chain, API tokens and the IoT Hub verification certificate, via the CLI.

The audit log is produced by a real server (EST issuance and refusal) and the
operator CLI (bootstrap, revoke, disable); tampering is done with plain SQL on
a copy of the data directory and its database, as an attacker with database access would.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

import serverdb
from backends import server_database
from estkit.pki.certs import serial_hex
from estkit.store.audit_chain import entry_hash
from estkit.store.models import AuditEvent
from estserver import EstServer, make_server, run_estkit
from estutil import csr_der, http, new_key, post_csr
from integration.conftest import bootstrap_device, enroll_operational

# -- audit log ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Audited:
    """A stopped server's data directory after a known sequence of operations."""

    data_dir: Path
    device_id: str
    bootstrap_serial: str
    operational_serial: str


@pytest.fixture(scope="module")
def audited(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Audited:
    tmp = tmp_path_factory.mktemp("audited")
    server = make_server(tmp, database_url=server_database(request, backend))
    device_id = "audit-dev-1"
    server.start()
    try:
        boot = bootstrap_device(server, device_id, tmp / "bootstrap")
        op = enroll_operational(server, device_id, boot, tmp / "operational")
        with http(server.root_pem, boot) as client:
            refused = post_csr(
                client, f"{server.url}/simpleenroll", csr_der(new_key(), "someone-else")
            )
        assert refused.status_code == 403, refused.text
        operational_serial = serial_hex(op.cert.serial_number)
        server.cli("cert", "revoke", operational_serial, "--reason", "keyCompromise")
        server.cli("device", "disable", device_id)
    finally:
        server.stop()
    return Audited(
        server.data_dir, device_id, serial_hex(boot.cert.serial_number), operational_serial
    )


def audit_verify(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return run_estkit("audit", "verify", "--data-dir", data_dir, check=False)


def audit_ids(data_dir: Path) -> list[int]:
    return [r[0] for r in serverdb.rows(data_dir, "SELECT id FROM audit_events ORDER BY id")]


def stored_event(row: list[Any]) -> AuditEvent:
    """An entry as read back: SQLite gives its time as text, PostgreSQL as a datetime."""
    at, actor, action, outcome, device_id, serial, detail = row
    when = at if isinstance(at, dt.datetime) else dt.datetime.fromisoformat(at)
    return AuditEvent(
        at=when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC),
        actor=actor,
        action=action,
        outcome=outcome,
        device_id=device_id,
        serial=serial,
        detail=detail,
    )


def rehash(conn: sa.Connection, entry_id: int) -> None:
    """What an attacker who knows the scheme does: recompute the edited entry's own hash."""
    prev, _, *fields = conn.execute(
        sa.text(
            "SELECT prev_hash, entry_hash, at, actor, action, outcome, device_id, serial, "
            "detail FROM audit_events WHERE id = :id"
        ),
        {"id": entry_id},
    ).one()
    conn.execute(
        sa.text("UPDATE audit_events SET entry_hash = :hash WHERE id = :id"),
        {"hash": entry_hash(prev, stored_event(fields), entry_id), "id": entry_id},
    )


def test_audit_verify_reports_intact_chain_with_every_entry_counted(audited: Audited) -> None:
    ((count,),) = serverdb.rows(audited.data_dir, "SELECT count(*) FROM audit_events")

    out = audit_verify(audited.data_dir)

    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"audit log: {count} entries, hash chain intact"
    assert count >= 5


def test_stored_audit_entries_hash_as_the_chain_says(audited: Audited) -> None:
    # Pins the test's own model of the chain (used by "rehashed" below) to the stored data.
    rows = serverdb.rows(
        audited.data_dir,
        "SELECT id, prev_hash, entry_hash, at, actor, action, outcome, device_id, serial, "
        "detail FROM audit_events ORDER BY id",
    )
    for entry_id, prev, stored, *fields in rows:
        assert entry_hash(prev, stored_event(fields), entry_id) == stored


@pytest.mark.parametrize(
    ("tamper", "where"),
    [
        ("UPDATE audit_events SET detail = 'nothing to see' WHERE id = :id", "middle"),
        ("UPDATE audit_events SET outcome = 'ok' WHERE id = :id", "middle"),
        ("UPDATE audit_events SET actor = 'cli:someone-else' WHERE id = :id", "first"),
        ("DELETE FROM audit_events WHERE id = :id", "middle"),
        ("DELETE FROM audit_events WHERE id = :id", "last"),
        ("UPDATE audit_events SET detail = 'edited and rehashed' WHERE id = :id", "rehashed"),
    ],
    ids=[
        "fail/middle-detail-edited",
        "fail/middle-outcome-edited",
        "fail/first-actor-edited",
        "fail/middle-entry-deleted",
        "fail/last-entry-deleted",
        "fail/middle-entry-edited-and-rehashed",
    ],
)
def test_audit_verify_names_the_first_tampered_entry(
    request: pytest.FixtureRequest,
    backend: str,
    audited: Audited,
    tmp_path: Path,
    tamper: str,
    where: str,
) -> None:
    database = server_database(request, backend)
    data_dir = serverdb.copy_data_dir(audited.data_dir, tmp_path / "copy", database)
    ids = audit_ids(data_dir)
    target = {"first": ids[0], "last": ids[-1]}.get(where, ids[len(ids) // 2])
    with serverdb.connect(data_dir) as conn:
        assert conn.execute(sa.text(tamper), {"id": target}).rowcount == 1
        if where == "rehashed":
            rehash(conn, target)
    # A rehashed entry still matches its own hash; the next entry's link to it breaks.
    broken_at = target + 1 if where == "rehashed" else target

    out = audit_verify(data_dir)

    assert out.returncode == 1, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"audit log broken at entry {broken_at}:" in lines[0]
    assert out.stdout == ""


@dataclass(frozen=True, slots=True)
class Expected:
    action: str
    outcome: str
    serial: str | None  # "bootstrap", "operational", or None for no serial
    detail: str
    actor: str  # prefix


@pytest.mark.parametrize(
    "expected",
    [
        Expected("cli-bootstrap", "ok", "bootstrap", "ca=bootstrap", "cli:"),
        Expected("est-simpleenroll", "ok", "operational", "ca=devices", "cert:"),
        Expected("enroll", "refused", None, "is not the authenticated device id", "cert:"),
        Expected("revoke", "ok", "operational", "keyCompromise", "cli:"),
        Expected("device-disable", "ok", None, "", "cli:"),
    ],
    ids=["ok/bootstrap-issuance", "ok/est-issuance", "ok/refusal", "ok/revocation", "ok/disable"],
)
def test_audit_log_records_each_decision_with_actor_device_and_serial(
    audited: Audited, expected: Expected
) -> None:
    serial = {
        "bootstrap": audited.bootstrap_serial,
        "operational": audited.operational_serial,
        None: None,
    }[expected.serial]
    rows = [
        r
        for r in serverdb.rows(
            audited.data_dir,
            "SELECT actor, device_id, serial, detail, at FROM audit_events "
            "WHERE action = :action AND outcome = :outcome",
            action=expected.action,
            outcome=expected.outcome,
        )
        if serial is None or r[2] == serial
    ]

    matching = [r for r in rows if expected.detail in r[3]]
    assert len(matching) == 1, rows
    actor, device_id, got_serial, _detail, at = matching[0]
    assert actor.startswith(expected.actor)
    assert device_id == audited.device_id, "entry does not name the device"
    if serial is not None:
        assert got_serial == serial
    assert at


# -- API tokens ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def operator_dir(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> EstServer:
    """A data directory (server not running) with token station-1, for commands that fail."""
    server = make_server(
        tmp_path_factory.mktemp("operator"), database_url=server_database(request, backend)
    )
    server.cli("token", "create", "--name", "station-1", "--scope", "provision")
    return server


def token_rows(data_dir: Path) -> list[tuple[str, str, str]]:
    return [
        (r[0], r[1], r[2])
        for r in serverdb.rows(data_dir, "SELECT name, token_hash, scopes FROM api_tokens")
    ]


def token_list(server: EstServer) -> dict[str, list[str]]:
    lines = server.cli("token", "list").stdout.splitlines()
    return {line.split("\t")[0]: line.split("\t")[1:] for line in lines}


def test_token_create_prints_only_the_token_and_stores_only_its_digest(
    fresh_server: EstServer,
) -> None:
    out = fresh_server.cli("token", "create", "--name", "station-1", "--scope", "provision")

    token = out.stdout.strip()
    assert out.stdout == token + "\n"
    assert token.startswith("estk_") and len(token) >= 30
    ((name, token_hash, scopes),) = token_rows(fresh_server.data_dir)
    assert name == "station-1" and "provision" in scopes
    assert token_hash != token
    assert token not in token_hash and token.removeprefix("estk_") not in token_hash
    again = fresh_server.cli("token", "create", "--name", "station-2", "--scope", "provision")
    assert again.stdout.strip() != token


def test_token_list_shows_scopes_and_state_and_revoke_marks_it_revoked(
    fresh_server: EstServer,
) -> None:
    fresh_server.cli("token", "create", "--name", "station-1", "--scope", "provision")
    fresh_server.cli(
        "token", "create", "--name", "auditor", "--scope", "read", "--scope", "admin",
        "--expires", "90d",
    )  # fmt: skip

    before = token_list(fresh_server)
    out = fresh_server.cli("token", "revoke", "station-1")
    after = token_list(fresh_server)

    assert before["station-1"][:3] == ["provision", "active", "expires never"]
    assert before["auditor"][:2] == ["admin,read", "active"]
    expires = dt.datetime.fromisoformat(before["auditor"][2].removeprefix("expires "))
    assert dt.timedelta(days=89) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(days=90)
    assert "station-1" in out.stdout
    assert after["station-1"][:2] == ["provision", "revoked"]
    assert after["auditor"][1] == "active"


@pytest.mark.parametrize(
    ("args", "returncode", "message"),
    [
        (["create", "--name", "station-1", "--scope", "provision"], 1, "station-1"),
        (["create", "--name", "s2", "--scope", "superuser"], 2, "invalid choice"),
        (["create", "--name", "s2"], 2, "--scope"),
        (["create", "--name", "s2", "--scope", "read", "--expires", "soon"], 1, "--expires"),
        (["create", "--name", "bad name!", "--scope", "read"], 1, "token name"),
        (["revoke", "nosuch"], 1, "nosuch"),
    ],
    ids=[
        "fail/duplicate-name",
        "fail/unknown-scope",
        "fail/no-scope",
        "fail/bad-expiry",
        "fail/bad-name",
        "fail/revoke-unknown-name",
    ],
)
def test_bad_token_command_fails_with_one_line_and_changes_nothing(
    operator_dir: EstServer, args: list[str], returncode: int, message: str
) -> None:
    before = token_rows(operator_dir.data_dir)

    out = operator_dir.cli("token", *args, check=False)

    assert out.returncode == returncode
    assert out.stdout == ""
    assert message in out.stderr
    if returncode == 1:  # argparse prints its usage first; our own errors are one line
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert token_rows(operator_dir.data_dir) == before


# -- IoT Hub proof of possession ---------------------------------------------------------


def test_iothub_verify_cert_has_the_code_as_cn_and_is_signed_by_the_devices_ca(
    operator_dir: EstServer, tmp_path: Path
) -> None:
    out_file = tmp_path / "v.pem"
    devices_pem = operator_dir.data_dir / "ca" / "devices.pem"

    operator_dir.cli("ca", "iothub-verify", "--code", "ABC123", "--out", out_file)

    (cert,) = x509.load_pem_x509_certificates(out_file.read_bytes())
    devices_ca = x509.load_pem_x509_certificate(devices_pem.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ABC123"
    cert.verify_directly_issued_by(devices_ca)
    verified = subprocess.run(
        ["openssl", "verify", "-partial_chain", "-CAfile", devices_pem, out_file],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert b"PRIVATE KEY" not in out_file.read_bytes()
    assert cert.public_bytes(Encoding.PEM) == out_file.read_bytes()
    (audited,) = serverdb.rows(
        operator_dir.data_dir,
        "SELECT actor, detail FROM audit_events WHERE action = 'iothub-verify'",
    )
    assert audited[0].startswith("cli:")
    assert audited[1].endswith(f"{serial_hex(cert.serial_number)} for CN=ABC123, signed by devices")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--code", ""], "--code"),
        (["--code", "A" * 65], "--code"),
        (["--code", "ABC123", "--ca", "nosuch"], "nosuch"),
    ],
    ids=["fail/empty-code", "fail/code-too-long", "fail/unknown-ca"],
)
def test_iothub_verify_refuses_bad_input_and_writes_nothing(
    operator_dir: EstServer, tmp_path: Path, extra: list[str], message: str
) -> None:
    out_file = tmp_path / "v.pem"

    out = operator_dir.cli("ca", "iothub-verify", *extra, "--out", out_file, check=False)

    assert out.returncode == 1
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not out_file.exists()
