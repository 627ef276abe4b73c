"""The enrollment path's statements on SQLite's DB-API (store/prepared.py) store exactly
what SQLAlchemy Core stores, and refuse what Core refuses.

SQLite only: on any other dialect a ``Prepared`` statement is the Core statement.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from backends import sqlite_only
from estkit.store import AuditEvent, CertificateRecord, CertStatus, SqlStore, schema
from estkit.store.prepared import Prepared
from estkit.store.sql import _PRESENTED_CERTIFICATE, _cert_row

pytestmark = sqlite_only

CEST = dt.timezone(dt.timedelta(hours=2))
# Not UTC and with microseconds: both must be converted as Core converts them.
ISSUED = dt.datetime(2026, 11, 27, 13, 4, 5, 123456, tzinfo=CEST)


def _record(serial: str, **changes: object) -> CertificateRecord:
    fields: dict[str, object] = {
        "serial": serial,
        "device_id": "dev-1",
        "ca": "devices",
        "label": None,
        "profile": "operational",
        "subject": "CN=dev-1",
        "sans": ("dev-1.example", "10.0.0.1"),
        "not_before": ISSUED - dt.timedelta(minutes=5),
        "not_after": ISSUED + dt.timedelta(days=30),
        "status": CertStatus.VALID,
        "requested_via": "simplereenroll",
        "requested_by": "cert:dev-1",
        "issued_at": ISSUED,
        "der": bytes(range(256)),
        "replaces": "0a" * 16,
    }
    fields.update(changes)
    return CertificateRecord(**fields)  # type: ignore[arg-type]


def _audit(serial: str) -> AuditEvent:
    return AuditEvent(
        at=ISSUED,
        actor="cert:dev-1",
        action="simplereenroll",
        outcome="ok",
        device_id="dev-1",
        serial=serial,
        detail="ca=devices profile=operational",
    )


def _rows(db_file: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db_file) as db:
        return list(db.execute(sql))


def test_a_certificate_is_stored_as_core_stores_it(store: SqlStore, tmp_path: Path) -> None:
    store.record_issued(_record("01" * 16), audit=_audit("01" * 16))  # the prepared path
    with store._engine.begin() as conn:  # Core, the same record under another serial
        conn.execute(schema.certificates.insert(), _cert_row(_record("02" * 16)))

    prepared, core = _rows(tmp_path / "estkit.db", "SELECT * FROM certificates ORDER BY serial")
    assert prepared[0] == "01" * 16 and core[0] == "02" * 16
    assert prepared[1:] == core[1:]
    assert "2026-11-27 11:04:05.123456" in prepared  # issued_at, in UTC, as Core writes it
    assert store.get_certificate("01" * 16) == _record("01" * 16)


def test_devices_match_core_and_the_audit_entry_is_chained_in_utc(
    store: SqlStore, tmp_path: Path
) -> None:
    store.record_issued(_record("01" * 16), audit=_audit("01" * 16))
    with store._engine.begin() as conn:
        conn.execute(
            schema.devices.insert(),
            {"device_id": "dev-2", "status": "active", "created_at": ISSUED, "updated_at": ISSUED},
        )
    db_file = tmp_path / "estkit.db"
    devices = _rows(db_file, "SELECT status, created_at, updated_at FROM devices ORDER BY 1, 2")
    assert len(devices) == 2 and devices[0] == devices[1]  # dev-1 (prepared), dev-2 (Core)
    (at,) = _rows(db_file, "SELECT at FROM audit_events WHERE serial = '" + "01" * 16 + "'")[0]
    assert at == "2026-11-27 11:04:05.123456"
    assert store.verify_audit_chain() == (1, None, "")  # the one entry, chained


def test_a_naive_time_is_refused_and_nothing_is_stored(store: SqlStore, tmp_path: Path) -> None:
    naive = _record("03" * 16, not_after=dt.datetime(2026, 12, 27, 12, 0))
    with pytest.raises(ValueError, match="naive datetime"):
        store.record_issued(naive, audit=_audit("03" * 16))
    assert _rows(tmp_path / "estkit.db", "SELECT count(*) FROM certificates") == [(0,)]
    assert _rows(tmp_path / "estkit.db", "SELECT count(*) FROM devices") == [(0,)]


def test_a_missing_parameter_is_an_error_not_a_null(store: SqlStore) -> None:
    select = Prepared(
        sa.select(schema.devices.c.status).where(schema.devices.c.device_id == sa.bindparam("dev"))
    )
    with store._engine.connect() as conn, pytest.raises(KeyError, match="dev"):
        select.execute(conn, {})


def test_a_column_that_needs_converting_cannot_be_selected(store: SqlStore) -> None:
    """Rows bypass SQLAlchemy's result processing: a UtcDateTime would come back as text."""
    select = Prepared(
        sa.select(schema.certificates.c.not_after).where(
            schema.certificates.c.serial == sa.bindparam("serial")
        )
    )
    with store._engine.connect() as conn, pytest.raises(TypeError, match="not_after"):
        select.execute(conn, {"serial": "01"})


def test_the_mtls_lookup_reads_what_core_reads(store: SqlStore) -> None:
    store.record_issued(_record("01" * 16), audit=_audit("01" * 16))
    presented = store.presented_certificate("01" * 16)
    with store._engine.connect() as conn:
        row = conn.execute(_PRESENTED_CERTIFICATE.statement, {"serial": "01" * 16}).one()
    assert presented is not None
    assert (
        presented.serial,
        presented.device_id,
        presented.ca,
        presented.status.value,
        presented.der,
        presented.device_status.value if presented.device_status else None,
    ) == tuple(row)
    assert store.presented_certificate("02" * 16) is None
