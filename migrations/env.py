"""Alembic environment. Run through ``discountctl db`` (core.store.migrate), which hands over an
open connection, so that migrations see the same URL handling and search_path as everything
else. Revisions are frozen; only autogenerate comparison (``alembic check``) reads the live
tables here.

Writing a revision: SQLite connections run with ``PRAGMA foreign_keys=ON`` (core.store.db), so
a batch operation that recreates a parent table (segments, rules, experiments) would delete its
children's rows through ON DELETE CASCADE; no revision does so yet. Every revision runs inside
the one transaction ``_serialize`` begins, where SQLite ignores ``PRAGMA foreign_keys``: one that
must recreate a parent table needs this file to switch foreign keys off before that transaction
(and back on, on that pooled connection, after it), and ``PRAGMA foreign_key_check`` before it
commits. The CHECK constraints of 0001 carry their names twice (``ck_events_ck_events_type``; the
naming convention prefixed names given in full): a revision that touches one names it so."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from core.store.db import CONNECT_TIMEOUT_S, PG_SCHEMA
from core.store.tables import Base

# The key of the PostgreSQL advisory lock that upgrades take: "discount" in ASCII.
MIGRATION_LOCK = int.from_bytes(b"discount", "big")
MIGRATION_WAIT_S = 600


def _serialize(connection: Connection) -> None:
    """Make a concurrent upgrade (an init container per replica) wait for this one, then find
    the work done, instead of failing on a table the other has just created. Taken before
    Alembic reads the store's revision, and held to the end of the transaction."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    else:
        # SQLite: a write lock from the start (the driver would begin only at the first row
        # written, and run CREATE TABLE outside any transaction before that), waited for as
        # long as another upgrade may take (an index over a large events table), not the few
        # seconds other commands wait.
        connection.exec_driver_sql(f"PRAGMA busy_timeout = {MIGRATION_WAIT_S * 1000}")
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        connection.exec_driver_sql(f"PRAGMA busy_timeout = {CONNECT_TIMEOUT_S * 1000}")


def run_migrations(connection: Connection) -> None:
    _serialize(connection)
    if connection.dialect.name == "postgresql":
        # The version table lands in this schema too, through the engine's search_path. Looked
        # up first: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the
        # schema is there, which an admin role that owns only the schema does not have.
        there = connection.scalar(
            text("SELECT 1 FROM pg_namespace WHERE nspname = :name"), {"name": PG_SCHEMA}
        )
        if not there:
            connection.execute(text(f"CREATE SCHEMA {PG_SCHEMA}"))
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
