"""The least-privilege PostgreSQL role discountd runs as: read what it serves from, add offers
and events, nothing else. The admin role (the schema's owner) migrates and runs discountctl.

Every table is classified here; a test fails when a new table is not, so widening the server's
rights is always a decision someone made.
"""

from __future__ import annotations

from sqlalchemy import Engine, text

from core.store.db import PG_SCHEMA
from core.store.errors import InvalidInput, NotFound

# Rules, experiments and clients to serve from; offers and events for budgets (money spent).
SERVER_READS = (
    "alembic_version",
    "segments",
    "segment_members",
    "rules",
    "experiments",
    "experiment_variants",
    "experiment_variant_rules",
    "model_versions",
    "clients",
    "offers",
    "events",
)
# Append-only: rows are inserted, never changed or deleted, by the server.
SERVER_INSERTS = ("offers", "events")
# Who changed what is the admins' record; the server neither reads nor writes it.
ADMIN_ONLY = ("audit_log",)


def server_grants(engine: Engine, role: str) -> list[str]:
    """The GRANT statements for ROLE, identifiers quoted by the database's own rules."""
    if engine.dialect.name != "postgresql":
        raise InvalidInput(
            "database roles exist only on PostgreSQL; an SQLite store is protected by its "
            "file permissions"
        )
    quote = engine.dialect.identifier_preparer.quote_identifier
    who, schema = quote(role), quote(PG_SCHEMA)

    def tables(names: tuple[str, ...]) -> str:
        return ", ".join(f"{schema}.{quote(n)}" for n in names)

    return [
        f"GRANT USAGE ON SCHEMA {schema} TO {who}",
        f"GRANT SELECT ON {tables(SERVER_READS)} TO {who}",
        f"GRANT INSERT ON {tables(SERVER_INSERTS)} TO {who}",
    ]


def grant_server_role(engine: Engine, role: str) -> list[str]:
    """Grant ROLE exactly the server's rights; the role must exist (it holds a password,
    which is not this command's business)."""
    statements = server_grants(engine, role)
    with engine.begin() as conn:
        if conn.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}) is None:
            raise NotFound(
                f"no PostgreSQL role {role!r}; create it first, e.g. "
                f"CREATE ROLE {engine.dialect.identifier_preparer.quote(role)} LOGIN PASSWORD '...'"
            )
        for statement in statements:
            conn.execute(text(statement))
    return statements
