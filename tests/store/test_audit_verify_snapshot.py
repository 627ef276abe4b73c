"""``verify_audit_chain`` reads the chain head and the entries in one snapshot: an entry
another node commits while it runs is not reported as a cut (on both backends)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

from estkit.store import SqlStore
from estkit.store.models import AuditEvent

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def _audit(store: SqlStore, n: int) -> None:
    store.add_pending(
        label="approved", device_id=f"dev-{n}", csr_sha256=f"{n:064x}", operation="simpleenroll",
        requested_by="test", now=T0,
        audit=AuditEvent(at=T0, actor="test", action="enroll", outcome="pending"),
    )  # fmt: skip


def test_an_entry_written_while_the_chain_is_verified_is_not_a_cut(
    store: SqlStore, database_url: str
) -> None:
    for n in range(3):
        _audit(store, n)
    other_node = SqlStore.open(database_url)
    written: list[int] = []

    def after_head_read(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FROM audit_head" in statement and not written:
            _audit(other_node, 100)  # another node's write lands between the two reads
            written.append(1)

    sa.event.listen(store._engine, "after_cursor_execute", after_head_read)
    try:
        checked, broken, why = store.verify_audit_chain()
    finally:
        sa.event.remove(store._engine, "after_cursor_execute", after_head_read)
        other_node.close()

    assert written, "the other node's write did not happen during the verification"
    assert (checked, broken, why) == (3, None, "")
    assert store.verify_audit_chain() == (4, None, "")
