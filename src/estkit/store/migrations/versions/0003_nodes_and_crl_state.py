"""Server nodes (several processes, regions, one database) and the shared CRL state.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from estkit.store.schema import UtcDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every server node registers itself and keeps last_seen fresh (a heartbeat).
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("region", sa.String(64), nullable=False),
        sa.Column("public_url", sa.String(512), nullable=False),
        sa.Column("started_at", UtcDateTime(), nullable=False),
        sa.Column("last_seen", UtcDateTime(), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
    )
    # One row per CA: ``revision`` grows with every revocation of that CA (in the
    # revoking transaction), ``number`` is the last CRL number any node issued
    # (RFC 5280 5.2.3: monotonically increasing, whichever node signs).
    op.create_table(
        "crl_state",
        sa.Column("ca", sa.String(64), primary_key=True),
        sa.Column("revision", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("number", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("updated_at", UtcDateTime(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("crl_state")
    op.drop_table("nodes")
