"""Indexes for the operator's read side (portal, `estkit cert|audit list`, metrics).

Measured on 1,000,000 certificates and as many audit entries (bench/portal.py): the
audit filters by actor, serial and action went from 120-190 ms (a scan) to under 1 ms;
`cert list --ca bootstrap` from 2.4 s to an index range; pending approvals are counted
without reading decided requests.

On a large PostgreSQL database each CREATE INDEX locks its table against writes while
it builds (seconds per million rows): run the upgrade in a maintenance window, or create
the indexes beforehand with CREATE INDEX CONCURRENTLY under these names.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

INDEXES = (
    ("ix_audit_events_actor_id", "audit_events", ["actor", "id"]),
    ("ix_audit_events_serial", "audit_events", ["serial"]),
    ("ix_audit_events_action_id", "audit_events", ["action", "id"]),
    ("ix_certificates_ca_serial", "certificates", ["ca", "serial"]),
    ("ix_pending_requests_status_id", "pending_requests", ["status", "id"]),
)


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
