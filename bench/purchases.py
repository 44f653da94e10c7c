"""What discountd's hold of recent purchases (server.purchases) costs: the full read a new
model version makes, a poll's read, and the memory held per purchase.

The store gets `purchases` sales of random users and items, stored 1,000 a minute (so a poll's
read, which reaches back a minute, re-reads 1,000): one in five a redemption of an offer, half of
those naming only the offer. SQLite always; PostgreSQL too with
--pg-url or DISCOUNT_BENCH_PG_URL.

    python -m bench.purchases [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import random
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from bench.doc import write_section
from bench.serving import bench_stores, cpu_name, store_options
from core.store import migrate
from core.store.db import Store
from core.store.events import EventIn, record
from core.store.offers import insert_offers
from server.purchases import MAX_HELD, RecentPurchases

SECTION = "## Recent purchases"
PER_MINUTE = 1000
REDEEMED = 5  # one sale in five at an offer's price
START = datetime(2026, 1, 1, tzinfo=UTC)


def fill(store: Store, purchases: int, users: int, items: int) -> None:
    """Every REDEEMED-th sale a redemption of an offer the store holds, every other one of
    those naming only its offer (the read takes its item from the offers table)."""
    rng = random.Random(0)
    for start in range(0, purchases, PER_MINUTE):
        at = START + timedelta(minutes=start // PER_MINUTE)
        batch, offers = [], []
        for n in range(start, min(start + PER_MINUTE, purchases)):
            user, item = f"user-{rng.randrange(users)}", f"{rng.randrange(items)}"
            if n % REDEEMED:
                batch.append(EventIn(f"e{n}", "purchase", user, item))
                continue
            offers.append(_offer(f"o{n}", user, item, at))
            named = item if n % (2 * REDEEMED) else ""
            batch.append(EventIn(f"e{n}", "redemption", user, named, offer_id=f"o{n}"))
        with store.transaction() as session:
            insert_offers(session, offers)
            record(session, batch, at)


def _offer(offer_id: str, user: str, item: str, at: datetime) -> dict[str, object]:
    return {
        "offer_id": offer_id, "user_id": user, "item_id": item, "rule_id": None,
        "segment": None, "experiment_key": None, "variant": None, "base_price": 10.0,
        "discount_pct": 10.0, "final_price": 9.0, "model_version": "v", "reason_codes": [],
        "issued_at": at, "expires_at": at + timedelta(minutes=15),
    }  # fmt: skip


def read(purchases: RecentPurchases) -> float:
    """Seconds one read takes, as discountd's poll makes it."""
    started = time.perf_counter()
    asyncio.run(_read(purchases))
    return time.perf_counter() - started


async def _read(purchases: RecentPurchases) -> None:
    await purchases.read()


def measure(store: Store) -> tuple[float, float, float]:
    """Seconds of the full read, milliseconds of a poll's read, bytes held per purchase."""
    data_end = START - timedelta(days=1)
    purchases = RecentPurchases(store, lambda: data_end, 60.0)
    full, poll = read(purchases), read(purchases)
    tracemalloc.start()
    held = RecentPurchases(store, lambda: data_end, 60.0)
    read(held)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return full, poll * 1000, size


@click.command(help=__doc__)
@click.option(
    "--purchases",
    default=300_000,
    show_default=True,
    help="Sales stored (purchases and redemptions).",
)
@click.option("--users", default=100_000, show_default=True, help="Distinct users they come from.")
@click.option("--items", default=50_000, show_default=True, help="Distinct items they name.")
@store_options
def main(purchases: int, users: int, items: int, pg_url: str, doc: Path) -> None:
    rows = []
    with contextlib.ExitStack() as stack:
        for name, url in bench_stores(stack, pg_url).items():
            store = Store(url)
            try:
                migrate.upgrade(store)
                click.echo(f"{name}: storing {purchases:,} sales", err=True)
                fill(store, purchases, users, items)
                full, poll_ms, size = measure(store)
            finally:
                store.dispose()
            rows.append(
                f"| {name} | {purchases:,} | {full:.2f} | {poll_ms:.1f} | {size / 1e6:.1f} "
                f"| {size / purchases:.0f} |"
            )
            click.echo(rows[-1], err=True)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = f"""Measured {now} with `python -m bench.purchases{" --pg-url ..." if pg_url else ""}` \
(`make bench-purchases`) on {cpu_name()}, Python {platform.python_version()}; the stores are \
local (PostgreSQL on the same cores).

The store holds {purchases:,} sales by {users:,} users of {items:,} items, stored \
{PER_MINUTE:,} a minute; one in {REDEEMED} is a redemption of an offer the store holds, half of \
those naming only the offer, whose item the read takes from the offers table. The full read is \
what discountd does when a model version starts serving (the newest sales since its data end, \
{MAX_HELD:,} at most); a poll's read is what it does every `--rules-poll-interval` (the sales of \
the last minute again, then nothing new). Memory held is tracemalloc's count after a full read, \
in one process.

| store | sales | full read s | poll's read ms | held MB | bytes per sale |
|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}
"""
    write_section(doc, SECTION, body, before="## Serving profile")
    click.echo(f"wrote {doc} ({SECTION})", err=True)


if __name__ == "__main__":
    main()
