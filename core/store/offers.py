"""Issued offers: written in batches by the server's offer log, read by reports.

server.offers issues them from the decisions of the pure pipeline, core.offers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import psycopg
from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from core.store.tables import Offer

_TABLE = cast(Table, Offer.__table__)


def insert_offers(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Write offer rows (Offer's columns); an offer id already stored is skipped, so a batch
    retried after a lost commit acknowledgement is not written twice."""
    if not rows:
        return
    dialect = session.get_bind().dialect
    if dialect.name == "postgresql":
        try:
            with session.begin_nested():
                _copy(session, dialect, rows)
            return
        except psycopg.errors.UniqueViolation:
            pass  # a retried batch, some of it stored: the insert below skips what is there
        except psycopg.Error as e:
            raise DBAPIError("COPY offers", None, e) from None
    insert = postgresql.insert if dialect.name == "postgresql" else sqlite.insert
    # The table, not the ORM class: a plain executemany, without the ORM's bulk bookkeeping.
    statement = insert(_TABLE).on_conflict_do_nothing(index_elements=["offer_id"])
    session.execute(statement, list(rows))


def _copy(session: Session, dialect: Dialect, rows: Sequence[dict[str, Any]]) -> None:
    """COPY the rows in, each value bound as SQLAlchemy binds it. Batches of 500 into a local
    PostgreSQL took 9 us of our CPU per offer this way against 20 as an executemany, which
    made the offer log the largest cost of GetOffers after the handler itself
    (docs/BENCHMARKS.md). COPY has no ON CONFLICT: insert_offers falls back on a duplicate."""
    columns = [
        (column.name, column.type.dialect_impl(dialect).bind_processor(dialect))
        for column in _TABLE.columns
    ]
    driver = session.connection().connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    names = ", ".join(name for name, _ in columns)
    with driver.cursor() as cursor, cursor.copy(f"COPY offers ({names}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([bind(row[name]) if bind else row[name] for name, bind in columns])
