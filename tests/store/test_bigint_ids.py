"""Ids past 2**31 (32-bit INTEGER's end on PostgreSQL before revision 0004): a fleet of
10,000,000 devices renewing daily writes that many audit entries in under a year."""

from __future__ import annotations

import datetime as dt

from estkit.store import PendingStatus, SqlStore, schema
from estkit.store.models import AuditEvent

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
BEYOND_INT32 = 3_000_000_000


def _next_ids_beyond(store: SqlStore, start: int) -> None:
    """Make the next audit entry and pending request ids larger than ``start``: an audit
    entry's id is the chain head's + 1; a pending request's comes from its sequence
    (PostgreSQL) or is the largest rowid + 1 (SQLite)."""
    engine = store._engine
    with engine.begin() as conn:
        conn.execute(schema.audit_head.update().values(last_id=start))
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT setval('pending_requests_id_seq', {start})")
        else:
            conn.execute(
                schema.pending_requests.insert().values(
                    id=start, label="old", device_id="old", csr_sha256="0" * 64,
                    operation="simpleenroll", requested_by="test", status="denied",
                    created_at=T0,
                )
            )  # fmt: skip


def test_pending_requests_and_audit_entries_get_and_keep_64_bit_ids(store: SqlStore) -> None:
    _next_ids_beyond(store, BEYOND_INT32)

    pending = store.add_pending(
        label="approved", device_id="dev-1", csr_sha256="a" * 64, operation="simpleenroll",
        requested_by="cert:dev-1", now=T0,
        audit=AuditEvent(at=T0, actor="cert:dev-1", action="enroll", outcome="pending"),
    )  # fmt: skip
    decided = store.decide_pending(
        pending.id, PendingStatus.APPROVED, by="cli:ops", reason=None, now=T0,
        audit=AuditEvent(at=T0, actor="cli:ops", action="approve", outcome="ok"),
    )  # fmt: skip

    assert pending.id > BEYOND_INT32
    assert decided.id == pending.id and decided.status is PendingStatus.APPROVED
    listed = store.list_pending(status=None, after=BEYOND_INT32).items
    assert [p.id for p in listed] == [pending.id]
    entries = store.list_audit(limit=1000).items
    assert sorted(e.id or 0 for e in entries) == [BEYOND_INT32 + 1, BEYOND_INT32 + 2]
