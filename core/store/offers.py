"""Issued offers: written in batches by the server's offer log, read by reports.

server.offers issues them from the decisions of the pure pipeline, core.offers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.store.tables import Offer


def insert_offers(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Write offer rows (Offer's columns); an offer id already stored is skipped, so a batch
    retried after a lost commit acknowledgement is not written twice."""
    if not rows:
        return
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    # The table, not the ORM class: a plain executemany, without the ORM's bulk bookkeeping.
    statement = insert(cast(Table, Offer.__table__)).on_conflict_do_nothing(
        index_elements=["offer_id"]
    )
    session.execute(statement, list(rows))
