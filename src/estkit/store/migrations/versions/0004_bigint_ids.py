"""64-bit ids on PostgreSQL for the tables that grow with the fleet.

Revision ID: 0004
Revises: 0003

``sa.Integer`` is 32 bits on PostgreSQL (and its SERIAL sequence stops at
2,147,483,647): a fleet of 10,000,000 devices renewing daily writes that many audit
entries in under a year. On SQLite an INTEGER PRIMARY KEY is already 64 bits, so
nothing changes there. On PostgreSQL each column is rewritten (the table is locked
while it is): run this upgrade in a maintenance window on a large database.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# (table, column, has its own sequence)
COLUMNS = (
    ("audit_events", "id", True),
    ("audit_head", "last_id", False),
    ("pending_requests", "id", True),
    ("enrollment_secrets", "id", True),
)


def upgrade() -> None:
    _resize(sa.BigInteger(), "bigint")


def downgrade() -> None:
    _resize(sa.Integer(), "integer")


def _resize(type_: sa.types.TypeEngine[int], sql_type: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column, sequenced in COLUMNS:
        op.alter_column(table, column, type_=type_, existing_nullable=False)
        if sequenced:
            op.execute(
                f"ALTER SEQUENCE {table}_{column}_seq AS {sql_type}"
                if sql_type == "bigint"
                else f"ALTER SEQUENCE {table}_{column}_seq AS {sql_type} MAXVALUE 2147483647"
            )
