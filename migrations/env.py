"""Alembic environment. Run through ``discountctl db`` (core.store.migrate), which hands over an
open connection, so that migrations see the same URL handling and search_path as everything
else. Revisions are frozen; only autogenerate comparison (``alembic check``) reads the live
tables here.

Writing a revision: SQLite connections run with ``PRAGMA foreign_keys=ON`` (core.store.db), so
a batch operation that recreates a parent table (segments, rules, experiments) would delete its
children's rows through ON DELETE CASCADE; no revision does so yet. One that must switches
foreign keys off around it, outside the transaction, and runs ``PRAGMA foreign_key_check``
after. The CHECK constraints of 0001 carry their names twice (``ck_events_ck_events_type``; the
naming convention prefixed names given in full): a revision that touches one names it so."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from core.store.db import PG_SCHEMA
from core.store.tables import Base


def run_migrations(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # The version table lands in this schema too, through the engine's search_path.
        connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {PG_SCHEMA}"))
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise SystemExit("run migrations with `discountctl db upgrade`, which opens the store")
run_migrations(connection)
