"""Alembic environment: runs on the connection that ``service.db.upgrade`` passes in (never a URL from a file)."""

from __future__ import annotations

from alembic import context

from service.db import metadata

conn = context.config.attributes["connection"]
context.configure(
    connection=conn,
    target_metadata=metadata,
    render_as_batch=conn.dialect.name == "sqlite",  # SQLite alters tables by copy-and-move
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations()
