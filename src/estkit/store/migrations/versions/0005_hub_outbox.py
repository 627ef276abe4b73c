"""The IoT Hub outbox: registry changes waiting to be sent (store/outbox.py).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from estkit.store.schema import Id, UtcDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hub_outbox",
        # 64 bits on PostgreSQL from the start (revision 0004 says why).
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("hub_status", sa.String(16), nullable=False),
        sa.Column("cause", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", UtcDateTime(), nullable=False),
        sa.Column("last_attempt_at", UtcDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("done_at", UtcDateTime(), nullable=True),
        sa.Column("lease_until", UtcDateTime(), nullable=True),
        sa.Column("lease_owner", sa.String(128), nullable=True),
    )
    op.create_index("ix_hub_outbox_device_id", "hub_outbox", ["device_id"])
    op.create_index("ix_hub_outbox_done_at", "hub_outbox", ["done_at"])
    op.create_index("ix_hub_outbox_state_due", "hub_outbox", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("hub_outbox")
