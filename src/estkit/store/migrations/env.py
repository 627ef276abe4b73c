"""Alembic environment: runs on the connection estkit hands it (see store.sql.migrate)."""

from __future__ import annotations

from alembic import context

from estkit.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
