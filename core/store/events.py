"""Storefront events: checked one by one, stored idempotently by the client's ``event_id``.

Each event gets its own verdict, so one bad event never costs the rest of the batch: rejected
events are named with a reason, the others are written in one INSERT ... ON CONFLICT DO NOTHING
(both backends), and an id already stored comes back as a duplicate instead of counting twice.
A resend is a duplicate only when it is the same event: an id stored with other content is
rejected, so a client that reuses an id for a new event hears that the new one was not stored.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

from sqlalchemy import Numeric, String, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.store.tables import BUYING, EVENT_TYPES, Event, Offer
from core.store.validate import CONTROL_CHARACTERS

# RecordEvents' cap (discount.proto): discountd refuses a larger call, discount-train replay sends
# no larger one.
MAX_BATCH = 1000
MAX_FUTURE = timedelta(days=1)
# Unix seconds from here on are past the year 5000, and as milliseconds these are 1973 on: a
# future time this large is a clock in milliseconds (JavaScript's Date.now()), not a wrong clock.
LOOKS_LIKE_MILLISECONDS = 10**11
# Items are what impressions, clicks, carts and purchases are about; a redemption names an offer.
NEEDS_ITEM = frozenset({"impression", "click", "add_to_cart", "purchase"})
_COLUMNS = cast(Table, Event.__table__).columns
# The widths of the store's columns: PostgreSQL refuses a longer id or a larger revenue, and
# with it the whole batch, on every retry (SQLite would store it), so they are refused here.
MAX_CHARS = {
    name: cast(String, _COLUMNS[name].type).length or 0
    for name in ("event_id", "user_id", "item_id", "offer_id")
}
MAX_REVENUE_CENTS = 10 ** (cast(Numeric[float], _COLUMNS["revenue"].type).precision or 0) - 1
# What makes two events with one id the same event. Not occurred_at: a client may stamp each
# attempt with the time it sends it, and that resend is still the same event.
CONTENT = ("type", "user_id", "item_id", "offer_id", "revenue", "quantity")
EVENT_ID_REUSED = "EVENT_ID_REUSED"


class Verdict(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


@dataclass(frozen=True)
class EventIn:
    """One event as a client sent it; ``type`` is "" when the client's type is unknown,
    ``occurred_at`` is Unix seconds (0: now)."""

    event_id: str
    type: str
    user_id: str
    item_id: str = ""
    offer_id: str = ""
    revenue_cents: int = 0
    quantity: int = 0
    occurred_at: int = 0


@dataclass(frozen=True)
class Outcome:
    event_id: str
    verdict: Verdict
    reason: str = ""


def problem(event: EventIn, now: datetime) -> str | None:
    """Why the event cannot be stored ("CODE: sentence"), or None when it can."""
    # Blank counts as missing, as Recommend and GetOffers read a user_id: " " names no one.
    if not event.event_id.strip():
        return "MISSING_EVENT_ID: every event needs a client-chosen event_id"
    if event.type not in EVENT_TYPES:
        return f"UNKNOWN_TYPE: type must be one of {', '.join(EVENT_TYPES)}"
    if not event.user_id.strip():
        return "MISSING_USER_ID: user_id is required"
    if event.type in NEEDS_ITEM and not event.item_id.strip():
        return f"MISSING_ITEM_ID: a {event.type} event names its item_id"
    if event.type == "redemption" and not event.offer_id.strip():
        return "MISSING_OFFER_ID: a redemption names the offer_id it redeems"
    for name, width in MAX_CHARS.items():
        if len(getattr(event, name)) > width:
            return f"ID_TOO_LONG: {name} is longer than {width} characters"
        if CONTROL_CHARACTERS.search(getattr(event, name)):
            # As the store's other ids (core.store.validate); PostgreSQL text cannot even hold
            # NUL, and the whole batch's insert would fail on every retry.
            return f"CONTROL_CHARACTER_IN_ID: {name} contains a control character"
    if event.revenue_cents < 0:
        return f"NEGATIVE_REVENUE: revenue_cents must be >= 0, got {event.revenue_cents}"
    if event.revenue_cents > MAX_REVENUE_CENTS:
        return f"REVENUE_TOO_LARGE: revenue_cents must be <= {MAX_REVENUE_CENTS}"
    if event.quantity < 0:
        return f"NEGATIVE_QUANTITY: quantity must be >= 0 (0 means 1), got {event.quantity}"
    if event.occurred_at < 0:
        return f"INVALID_TIME: occurred_at is Unix seconds >= 0, got {event.occurred_at}"
    if event.occurred_at and _time(event.occurred_at, now) > now + MAX_FUTURE:
        if event.occurred_at >= LOOKS_LIKE_MILLISECONDS:
            return (
                f"FUTURE_TIME: occurred_at is Unix seconds; {event.occurred_at} looks like "
                "milliseconds: divide by 1000"
            )
        return "FUTURE_TIME: occurred_at is more than a day in the future; check the clock"
    return None


def _time(occurred_at: int, now: datetime) -> datetime:
    if not occurred_at:
        return now
    try:
        return datetime.fromtimestamp(occurred_at, UTC)
    except (OverflowError, OSError, ValueError):
        return datetime.max.replace(tzinfo=UTC)


def _row(event: EventIn, now: datetime) -> dict[str, object]:
    return {
        "event_id": event.event_id,
        "type": event.type,
        "user_id": event.user_id,
        "item_id": event.item_id or None,
        "offer_id": event.offer_id or None,
        "revenue": event.revenue_cents / 100 if event.revenue_cents else None,
        "quantity": event.quantity or 1,
        "occurred_at": _time(event.occurred_at, now),
        "received_at": now,
    }


def _cents(revenue: object) -> int:
    return round(cast(float, revenue) * 100) if revenue is not None else 0


def _differs(event: EventIn, row: Mapping[str, object], now: datetime) -> str | None:
    """The first field in which the event is not the one stored as row, or None."""
    mine = _row(event, now)
    for name in CONTENT:
        if name == "revenue":  # a float from cents, compared in cents
            if _cents(mine[name]) != _cents(row[name]):
                return name
        elif mine[name] != row[name]:
            return name
    return None


def _resent(event: EventIn, row: Mapping[str, object], now: datetime) -> Outcome:
    """DUPLICATE for a resend of the stored event, REJECTED for another event under its id."""
    field = _differs(event, row, now)
    if field is None:
        return Outcome(event.event_id, Verdict.DUPLICATE)
    return Outcome(
        event.event_id,
        Verdict.REJECTED,
        f"{EVENT_ID_REUSED}: an event with this event_id and another {field} is already stored; "
        "resend an event unchanged, and give a new event a new event_id",
    )


def record(session: Session, events: Sequence[EventIn], now: datetime) -> list[Outcome]:
    """Store the valid events (within the caller's transaction); one Outcome per event, in order.

    A repeat of an id within the batch is a duplicate of its first occurrence (rejected when
    its content differs), as is an id stored before.
    """
    if len(events) > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} events per call, got {len(events)}")
    outcomes: list[Outcome | None] = []  # None: valid, decided once the insert has run
    rows: dict[str, dict[str, object]] = {}
    first: set[int] = set()
    for n, event in enumerate(events):
        why = problem(event, now)
        if why is not None:
            outcomes.append(Outcome(event.event_id, Verdict.REJECTED, why))
            continue
        if event.event_id not in rows:
            rows[event.event_id] = _row(event, now)
            first.add(n)
        outcomes.append(None)
    stored: set[str] = set()
    if rows:
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        # In one order of ids for every writer: two processes storing batches that share
        # ids (a retry sent to another replica) would otherwise each hold rows the other
        # waits for, and PostgreSQL would end one of them as a deadlock.
        statement = (
            insert(Event)
            .values([rows[event_id] for event_id in sorted(rows)])
            .on_conflict_do_nothing(index_elements=["event_id"])
            .returning(Event.event_id)
        )
        stored = set(session.scalars(statement))
    # What each valid event's id holds now: this batch's row, or the one stored before it.
    held: dict[str, Mapping[str, object]] = {i: rows[i] for i in stored}
    if len(stored) < len(rows):
        columns = [_COLUMNS[name] for name in ("event_id", *CONTENT)]
        query = select(*columns).where(Event.event_id.in_([i for i in rows if i not in stored]))
        held |= {row["event_id"]: dict(row) for row in session.execute(query).mappings()}
    return [
        o
        if o is not None
        else Outcome(event.event_id, Verdict.ACCEPTED)
        if n in first and event.event_id in stored
        else _resent(event, held[event.event_id], now)
        for n, (o, event) in enumerate(zip(outcomes, events, strict=True))
    ]


def purchases_received_after(
    session: Session, after: datetime, limit: int | None = None, user_id: str | None = None
) -> list[tuple[str, str, datetime]]:
    """(user_id, item_id, received_at) of the sales (purchases and redemptions) stored after the
    given time (the newest `limit` of them, when given; only user_id's, when given), read
    through the (type, received_at) index. A redemption that names no item was of its offer's
    item; one whose offer the store does not hold names no item, and is left out."""
    item = func.coalesce(Event.item_id, Offer.item_id)
    query = (
        select(Event.user_id, item, Event.received_at)
        .outerjoin(Offer, Offer.offer_id == Event.offer_id)
        .where(Event.type.in_(BUYING), Event.received_at > after, item.is_not(None))
    )
    if user_id is not None:
        query = query.where(Event.user_id == user_id)
    if limit is not None:
        query = query.order_by(Event.received_at.desc()).limit(limit)
    return [(user, item, received) for user, item, received in session.execute(query)]


def sold(
    session: Session, events: Sequence[EventIn], outcomes: Sequence[Outcome]
) -> list[tuple[str, str]]:
    """(user_id, item_id) of each sale of a recorded batch that the store holds (accepted, or
    stored before), a redemption without an item taking its offer's item where the store holds
    the offer (one still in the offer log's queue is found by the next purchases poll)."""
    kept = [
        e
        for e, o in zip(events, outcomes, strict=True)
        if e.type in BUYING and o.verdict is not Verdict.REJECTED
    ]
    unnamed = {e.offer_id for e in kept if not e.item_id}
    items: dict[str, str] = {}
    if unnamed:
        query = select(Offer.offer_id, Offer.item_id).where(Offer.offer_id.in_(unnamed))
        items = {offer: item for offer, item in session.execute(query)}
    pairs = [(e.user_id, e.item_id or items.get(e.offer_id, "")) for e in kept]
    return [(user, item) for user, item in pairs if item]


# What each stored type is as an interaction `discount-train fit` reads (docs/TRAINING.md); an
# impression is an offer shown, not a product viewed, and is no interaction.
AS_INTERACTION = {
    "click": "click",
    "add_to_cart": "cart",
    "purchase": "purchase",
    "redemption": "purchase",
}


@dataclass(frozen=True)
class Interaction:
    user_id: str
    item_id: str
    occurred_at: datetime
    event: str  # fit's event column: purchase, click or cart
    quantity: int
    unit_price: float | None  # revenue / quantity; None without revenue


def interactions(
    session: Session, since: datetime | None = None, until: datetime | None = None
) -> Iterator[Interaction | None]:
    """The stored events as interactions, oldest first, occurred in [since, until); None for a
    sale without an item (a redemption whose offer the store does not hold). Read in chunks, so
    millions of events never sit in memory together. A user's events of one item at one time
    come together, for a caller that writes alike ones as one row."""
    item = func.coalesce(Event.item_id, Offer.item_id)
    query = (
        select(Event.user_id, item, Event.occurred_at, Event.type, Event.quantity, Event.revenue)
        .outerjoin(Offer, Offer.offer_id == Event.offer_id)
        .where(Event.type.in_(list(AS_INTERACTION)))
        .order_by(Event.occurred_at, Event.user_id, item, Event.event_id)
        .execution_options(yield_per=10_000)
    )
    if since is not None:
        query = query.where(Event.occurred_at >= since)
    if until is not None:
        query = query.where(Event.occurred_at < until)
    for user, item_id, at, kind, quantity, revenue in session.execute(query):
        if item_id is None:
            yield None
            continue
        n = quantity or 1
        price = None if revenue is None else revenue / n
        yield Interaction(user, item_id, at, AS_INTERACTION[kind], n, price)
