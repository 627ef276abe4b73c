"""Table definitions (SQLAlchemy Core). Changes here need an Alembic migration."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa


class UtcDateTime(sa.TypeDecorator[dt.datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out (SQLite keeps no zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use aware UTC datetimes")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


# The id of a table that grows with the fleet (audit entries, pending requests,
# enrollment secrets): 64 bits on PostgreSQL (revision 0004); on SQLite an INTEGER
# PRIMARY KEY is 64 bits already, and must stay INTEGER to be the rowid.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData()

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
)

certificates = sa.Table(
    "certificates",
    metadata,
    sa.Column("serial", sa.String(42), primary_key=True),
    sa.Column("device_id", sa.String(128), nullable=False, index=True),
    sa.Column("ca", sa.String(64), nullable=False),
    sa.Column("label", sa.String(64), nullable=True),
    sa.Column("profile", sa.String(64), nullable=False),
    sa.Column("subject", sa.Text(), nullable=False),
    sa.Column("sans", sa.Text(), nullable=False),
    sa.Column("not_before", UtcDateTime(), nullable=False),
    sa.Column("not_after", UtcDateTime(), nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("requested_via", sa.String(32), nullable=False),
    sa.Column("requested_by", sa.String(256), nullable=False),
    sa.Column("issued_at", UtcDateTime(), nullable=False),
    sa.Column("der", sa.LargeBinary(), nullable=False),
    sa.Column("revoked_at", UtcDateTime(), nullable=True),
    sa.Column("revocation_reason", sa.String(32), nullable=True),
    sa.Column("replaces", sa.String(42), nullable=True),
    sa.Index("ix_certificates_ca_serial", "ca", "serial"),  # revision 0006
)

enrollment_secrets = sa.Table(
    "enrollment_secrets",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(128), nullable=False, index=True),
    sa.Column("secret_hash", sa.LargeBinary(), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("expires_at", UtcDateTime(), nullable=False),
    sa.Column("used_at", UtcDateTime(), nullable=True),
)

audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("at", UtcDateTime(), nullable=False, index=True),
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("device_id", sa.String(128), nullable=True, index=True),
    sa.Column("serial", sa.String(42), nullable=True),
    sa.Column("detail", sa.Text(), nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False, server_default=""),
    sa.Column("entry_hash", sa.String(64), nullable=False, server_default=""),
    # revision 0006: the read side's filters.
    sa.Index("ix_audit_events_actor_id", "actor", "id"),
    sa.Index("ix_audit_events_serial", "serial"),
    sa.Index("ix_audit_events_action_id", "action", "id"),
)

# -- revision 0002: API tokens, pending requests, audit hash chain -------------------

api_tokens = sa.Table(
    "api_tokens",
    metadata,
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

pending_requests = sa.Table(
    "pending_requests",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("label", sa.String(64), nullable=False),
    sa.Column("device_id", sa.String(128), nullable=False, index=True),
    sa.Column("csr_sha256", sa.String(64), nullable=False, index=True),
    sa.Column("operation", sa.String(32), nullable=False),
    sa.Column("requested_by", sa.String(256), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("decided_at", UtcDateTime(), nullable=True),
    sa.Column("decided_by", sa.String(256), nullable=True),
    sa.Column("reason", sa.Text(), nullable=True),
    sa.Column("serial", sa.String(42), nullable=True),
    sa.Index("ix_pending_requests_status_id", "status", "id"),  # revision 0006
)

# One row (id = 1): the newest audit entry's id and hash. Every write
# transaction updates it first, which serialises writers on SQLite and on
# PostgreSQL alike, so the hash chain never forks.
audit_head = sa.Table(
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("last_id", Id, nullable=False),
    sa.Column("last_hash", sa.String(64), nullable=False),
)

nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("region", sa.String(64), nullable=False),
    sa.Column("public_url", sa.String(512), nullable=False),
    sa.Column("started_at", UtcDateTime(), nullable=False),
    sa.Column("last_seen", UtcDateTime(), nullable=False),
    sa.Column("version", sa.String(32), nullable=False),
)

crl_state = sa.Table(
    "crl_state",
    metadata,
    sa.Column("ca", sa.String(64), primary_key=True),
    sa.Column("revision", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("number", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("updated_at", UtcDateTime(), nullable=True),
)

# -- revision 0005: the IoT Hub outbox (store/outbox.py) ---------------------------------

# One row per device change the hub's identity registry is to learn, written in the
# transaction of the change; a sender holds a row while it sends it (``lease_until``).
hub_outbox = sa.Table(
    "hub_outbox",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(128), nullable=False, index=True),
    sa.Column("hub_status", sa.String(16), nullable=False),
    sa.Column("cause", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("next_attempt_at", UtcDateTime(), nullable=False),
    sa.Column("last_attempt_at", UtcDateTime(), nullable=True),
    sa.Column("last_error", sa.Text(), nullable=True),
    sa.Column("done_at", UtcDateTime(), nullable=True, index=True),
    sa.Column("lease_until", UtcDateTime(), nullable=True),
    sa.Column("lease_owner", sa.String(128), nullable=True),
    sa.Index("ix_hub_outbox_state_due", "state", "next_attempt_at"),
)
