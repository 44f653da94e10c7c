"""Storefront events: checked one by one, stored idempotently by the client's ``event_id``.

Each event gets its own verdict, so one bad event never costs the rest of the batch: rejected
events are named with a reason, the others are written in one INSERT ... ON CONFLICT DO NOTHING
(both backends), and an id already stored comes back as a duplicate instead of counting twice.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.store.tables import EVENT_TYPES, ID_LENGTH, Event

MAX_BATCH = 1000
MAX_FUTURE = timedelta(days=1)
# Items are what impressions, clicks, carts and purchases are about; a redemption names an offer.
NEEDS_ITEM = frozenset({"impression", "click", "add_to_cart", "purchase"})


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
    if not event.event_id:
        return "MISSING_EVENT_ID: every event needs a client-chosen event_id"
    if event.type not in EVENT_TYPES:
        return f"UNKNOWN_TYPE: type must be one of {', '.join(EVENT_TYPES)}"
    if not event.user_id:
        return "MISSING_USER_ID: user_id is required"
    if event.type in NEEDS_ITEM and not event.item_id:
        return f"MISSING_ITEM_ID: a {event.type} event names its item_id"
    if event.type == "redemption" and not event.offer_id:
        return "MISSING_OFFER_ID: a redemption names the offer_id it redeems"
    for name in ("event_id", "user_id", "item_id", "offer_id"):
        if len(getattr(event, name)) > ID_LENGTH:
            return f"ID_TOO_LONG: {name} is longer than {ID_LENGTH} characters"
        if "\x00" in getattr(event, name):
            # PostgreSQL text cannot hold NUL: the whole batch's insert would fail on every retry.
            return f"NUL_IN_ID: {name} contains a NUL character, which the store cannot hold"
    if event.revenue_cents < 0:
        return f"NEGATIVE_REVENUE: revenue_cents must be >= 0, got {event.revenue_cents}"
    if event.quantity < 0:
        return f"NEGATIVE_QUANTITY: quantity must be >= 0 (0 means 1), got {event.quantity}"
    if event.occurred_at < 0:
        return f"INVALID_TIME: occurred_at is Unix seconds >= 0, got {event.occurred_at}"
    if event.occurred_at and _time(event.occurred_at, now) > now + MAX_FUTURE:
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


def record(session: Session, events: Sequence[EventIn], now: datetime) -> list[Outcome]:
    """Store the valid events (within the caller's transaction); one Outcome per event, in order.

    A repeat of an id within the batch is a duplicate of its first occurrence.
    """
    if len(events) > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} events per call, got {len(events)}")
    outcomes: list[Outcome | None] = []
    rows: dict[str, dict[str, object]] = {}
    for event in events:
        why = problem(event, now)
        if why is not None:
            outcomes.append(Outcome(event.event_id, Verdict.REJECTED, why))
        elif event.event_id in rows:
            outcomes.append(Outcome(event.event_id, Verdict.DUPLICATE))
        else:
            rows[event.event_id] = _row(event, now)
            outcomes.append(None)
    stored: set[str] = set()
    if rows:
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        statement = (
            insert(Event)
            .values(list(rows.values()))
            .on_conflict_do_nothing(index_elements=["event_id"])
            .returning(Event.event_id)
        )
        stored = set(session.scalars(statement))
    return [
        o
        if o is not None
        else Outcome(
            event.event_id, Verdict.ACCEPTED if event.event_id in stored else Verdict.DUPLICATE
        )
        for o, event in zip(outcomes, events, strict=True)
    ]
