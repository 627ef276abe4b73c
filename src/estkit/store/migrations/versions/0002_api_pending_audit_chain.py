"""API tokens, pending enrollment requests, and the audit log's hash chain.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

from estkit.store.audit_chain import GENESIS, entry_hash
from estkit.store.models import AuditEvent
from estkit.store.schema import UtcDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("scopes", sa.String(256), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=True),
        sa.Column("revoked_at", UtcDateTime(), nullable=True),
        sa.Column("last_used_at", UtcDateTime(), nullable=True),
    )
    op.create_table(
        "pending_requests",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("csr_sha256", sa.String(64), nullable=False),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("requested_by", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("decided_at", UtcDateTime(), nullable=True),
        sa.Column("decided_by", sa.String(256), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("serial", sa.String(42), nullable=True),
    )
    op.create_index("ix_pending_requests_device_id", "pending_requests", ["device_id"])
    op.create_index("ix_pending_requests_csr_sha256", "pending_requests", ["csr_sha256"])
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("prev_hash", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("entry_hash", sa.String(64), nullable=False, server_default=""))
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("last_id", sa.Integer(), nullable=False),
        sa.Column("last_hash", sa.String(64), nullable=False),
    )
    # Chain the entries written before this revision, in id order.
    conn = op.get_bind()
    events = sa.table(
        "audit_events",
        *(
            sa.column(c)
            for c in ("id", "actor", "action", "outcome", "device_id", "serial", "detail")
        ),
        sa.column("at", UtcDateTime()),
        sa.column("prev_hash"),
        sa.column("entry_hash"),
    )
    prev, last_id = GENESIS, 0
    for row in conn.execute(sa.select(events).order_by(events.c.id)).all():
        at = row.at if row.at.tzinfo else row.at.replace(tzinfo=dt.UTC)
        event = AuditEvent(
            at=at,
            actor=row.actor,
            action=row.action,
            outcome=row.outcome,
            device_id=row.device_id,
            serial=row.serial,
            detail=row.detail,
        )
        digest = entry_hash(prev, event, row.id)
        conn.execute(
            events.update().where(events.c.id == row.id).values(prev_hash=prev, entry_hash=digest)
        )
        prev, last_id = digest, row.id
    op.bulk_insert(head, [{"id": 1, "last_id": last_id, "last_hash": prev}])


def downgrade() -> None:
    op.drop_table("audit_head")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("entry_hash")
        batch.drop_column("prev_hash")
    op.drop_table("pending_requests")
    op.drop_table("api_tokens")
