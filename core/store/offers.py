"""Issued offers: written in batches by the server's offer log, read by reports and by
``discountctl offers export`` (the log a response model learns from).

server.offers issues them from the decisions of the pure pipeline, core.offers."""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import psycopg
from sqlalchemy import ColumnElement, Table, and_, func, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from core.store.tables import BUYING, Event, Offer

_TABLE = cast(Table, Offer.__table__)
_NAMES = [column.name for column in _TABLE.columns]
_SQLITE_INSERT = (
    f"INSERT INTO offers ({', '.join(_NAMES)}) VALUES ({', '.join('?' * len(_NAMES))}) "
    "ON CONFLICT (offer_id) DO NOTHING"
)


def insert_offers(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Write offer rows (Offer's columns); an offer id already stored is skipped, so a batch
    retried after a lost commit acknowledgement is not written twice."""
    if not rows:
        return
    dialect = session.get_bind().dialect
    if dialect.name == "sqlite":
        session.connection().exec_driver_sql(_SQLITE_INSERT, _bound(dialect, rows))
        return
    try:
        with session.begin_nested():
            _copy(session, dialect, rows)
        return
    except psycopg.errors.UniqueViolation:
        pass  # a retried batch, some of it stored: the insert below skips what is there
    # As SQLAlchemy would wrap them, so that a row the table refuses is told from an outage.
    except psycopg.DataError as e:
        raise DataError("COPY offers", None, e) from None
    except psycopg.IntegrityError as e:
        raise IntegrityError("COPY offers", None, e) from None
    except psycopg.Error as e:
        raise DBAPIError("COPY offers", None, e) from None
    # The table, not the ORM class: a plain executemany, without the ORM's bulk bookkeeping.
    statement = postgresql.insert(_TABLE).on_conflict_do_nothing(index_elements=["offer_id"])
    session.execute(statement, [{name: row.get(name) for name in _NAMES} for row in rows])


def _bound(dialect: Dialect, rows: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The rows' values in _NAMES order, each as SQLAlchemy would bind it for dialect, without
    its per-statement machinery: that and formatting every offer's two times again were 2/3
    of a SQLite insert (20 us of CPU per offer, 12 this way, in 500-offer batches). An
    answer's offers share their times and often their reason codes, so each distinct value is
    bound once per batch."""
    columns = [
        (column.name, column.type.dialect_impl(dialect).bind_processor(dialect))
        for column in _TABLE.columns
    ]
    bound: dict[tuple[str, Hashable], Any] = {}
    out = []
    for row in rows:
        values = []
        for name, process in columns:
            # A row spilled by a discountd older than a column lacks it: NULL, as the
            # migration that added the column left the offers already stored.
            value = row.get(name)
            if process is not None and value is not None:
                key = (name, _hashable(value))
                if key not in bound:
                    bound[key] = process(value)
                value = bound[key]
            values.append(value)
        out.append(tuple(values))
    return out


def _hashable(value: Any) -> Hashable:
    """The same value as a key: reason codes are lists, user features a dict."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return tuple(value.items())
    return cast(Hashable, value)


def _copy(session: Session, dialect: Dialect, rows: Sequence[dict[str, Any]]) -> None:
    """COPY the rows in. Batches of 500 into a local PostgreSQL took 9 us of our CPU per offer
    this way against 20 as an executemany, which made the offer log the largest cost of
    GetOffers after the handler itself (docs/BENCHMARKS.md). COPY has no ON CONFLICT:
    insert_offers falls back on a duplicate."""
    driver = session.connection().connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    with (
        driver.cursor() as cursor,
        cursor.copy(f"COPY offers ({', '.join(_NAMES)}) FROM STDIN") as copy,
    ):
        for values in _bound(dialect, rows):
            copy.write_row(values)


@dataclass(frozen=True)
class LogFilter:
    """Which offers: issued in [since, until), under a rule (by id) and in an experiment."""

    rule_id: int | None = None
    experiment_key: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def clauses(self) -> list[ColumnElement[bool]]:
        out = []
        if self.rule_id is not None:
            out.append(Offer.rule_id == self.rule_id)
        if self.experiment_key is not None:
            out.append(Offer.experiment_key == self.experiment_key)
        if self.since is not None:
            out.append(Offer.issued_at >= self.since)
        if self.until is not None:
            out.append(Offer.issued_at < self.until)
        return out


# What a response model needs of an offer, NULL before migration 0006; a score, also for an
# item the serving model could not score.
_LEARNABLE = (Offer.propensity.is_not(None), Offer.cf_score.is_not(None), Offer.cost.is_not(None))
CHUNK = 10_000


def response_offers(session: Session, which: LogFilter) -> Iterator[Any]:
    """The offers a response model can learn from, oldest first, in chunks: offer_id, user_id,
    item_id, rank, cf_score, base_price, cost, discount_pct, propensity, user_features,
    reason_codes, model_version."""
    query = (
        select(
            Offer.offer_id,
            Offer.user_id,
            Offer.item_id,
            Offer.rank,
            Offer.cf_score,
            Offer.base_price,
            Offer.cost,
            Offer.discount_pct,
            Offer.propensity,
            Offer.user_features,
            Offer.reason_codes,
            Offer.model_version,
        )
        .where(*which.clauses(), *_LEARNABLE)
        .order_by(Offer.issued_at, Offer.offer_id)
        .execution_options(yield_per=CHUNK)
    )
    yield from session.execute(query)


def response_model_versions(session: Session, which: LogFilter) -> list[str]:
    """The model versions that priced those offers."""
    query = select(Offer.model_version).where(*which.clauses(), *_LEARNABLE).distinct()
    return list(session.scalars(query))


def unlearnable_offers(session: Session, which: LogFilter) -> int:
    """How many of the offers lack what a response model needs (logged before migration 0006,
    or of an item the model had no score for)."""
    query = select(func.count()).where(*which.clauses(), ~and_(*_LEARNABLE))
    return session.scalar(query.select_from(Offer)) or 0


def response_sales(session: Session, which: LogFilter) -> Iterator[Any]:
    """The purchases and redemptions naming those offers, oldest first, in chunks: event_id,
    type, user_id, item_id, offer_id, revenue, quantity, occurred_at."""
    query = (
        select(
            Event.event_id,
            Event.type,
            Event.user_id,
            Event.item_id,
            Event.offer_id,
            Event.revenue,
            Event.quantity,
            Event.occurred_at,
        )
        .join(Offer, Offer.offer_id == Event.offer_id)
        .where(Event.type.in_(BUYING), *which.clauses(), *_LEARNABLE)
        .order_by(Event.occurred_at, Event.event_id)
        .execution_options(yield_per=CHUNK)
    )
    yield from session.execute(query)
