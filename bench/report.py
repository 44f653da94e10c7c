"""What `discountctl experiments report` costs on a long experiment: wall time and peak memory.

The store gets an experiment of three variants without rules (the report reads the offer log,
not the rules) whose `users` users were all offered something, `offers` offers in all, and `events`
events in the shapes discountd writes: impressions 70%, clicks 15%, carts 10%, purchases 3%,
redemptions 2%, each about one offer of its user, within 20 days of it. SQLite always;
PostgreSQL too with --pg-url or DISCOUNT_BENCH_PG_URL. The figure is the report command itself,
`--output json`, run as a separate process, `--runs` times.

    python -m bench.report [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import numpy as np
from sqlalchemy import insert

from bench.doc import write_section
from bench.serving import BIN, F, bench_stores, cpu_name, store_options
from core.store.db import Store
from core.store.tables import Event, Offer

SECTION = "## Experiment report"
NOTES = "### Notes on the report figures"  # written by hand; a rerun keeps them
KEY = "bench"
VARIANTS = ("control", "a", "b")
KINDS = ("impression", "click", "add_to_cart", "purchase", "redemption")
SHARES = (0.70, 0.15, 0.10, 0.03, 0.02)
CHUNK = 20_000
START = datetime(2026, 1, 1, tzinfo=UTC)


def ctl(url: str, *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "discountctl"), "--db-url", url, "--actor", "bench", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout


def fill(url: str, users: int, offers: int, events: int) -> None:
    """The experiment, its offer log and its users' events; the same for the same sizes."""
    ctl(url, "db", "upgrade")
    ctl(url, "experiments", "create", KEY, *(f"--variant={v}:{w}" for v, w in zip(
        VARIANTS, (34, 33, 33), strict=True)))  # fmt: skip
    ctl(url, "experiments", "start", KEY)
    rng = np.random.default_rng(0)
    variant = rng.choice(len(VARIANTS), users)
    owner = np.concatenate([np.arange(users), rng.integers(0, users, offers - users)])
    item = rng.integers(0, 5_000, offers)
    base = 10.0 + item % 90
    pct = np.where(variant[owner] == 0, 0.0, 10.0)
    final = np.round(base * (1 - pct / 100), 2)
    issued = rng.integers(0, 40 * 86_400, offers)
    store = Store(url)
    try:
        _insert(store, Offer, offers, lambda k: {
            "offer_id": f"o{k}", "user_id": f"u{owner[k]}", "item_id": f"{item[k]:05d}",
            "rule_id": None, "segment": None, "experiment_key": KEY,
            "variant": VARIANTS[variant[owner[k]]], "base_price": float(base[k]),
            "discount_pct": float(pct[k]), "final_price": float(final[k]),
            "model_version": "bench", "reason_codes": [],
            "issued_at": START + timedelta(seconds=int(issued[k]), microseconds=k % 1_000_000),
            "expires_at": START + timedelta(seconds=int(issued[k]) + 3_600),
        })  # fmt: skip
        kind = np.asarray(KINDS)[rng.choice(len(KINDS), events, p=SHARES)]
        about = rng.integers(0, offers, events)
        when = issued[about] + rng.integers(-3_600, 20 * 86_400, events)

        def event(k: int) -> dict[str, Any]:
            o, what = about[k], str(kind[k])
            buying = what in ("purchase", "redemption")
            at = START + timedelta(seconds=int(when[k]))
            return {
                "event_id": f"e{k}", "type": what, "user_id": f"u{owner[o]}",
                "item_id": None if what == "redemption" else f"{item[o]:05d}",
                "offer_id": None if what == "purchase" else f"o{o}",
                "revenue": float(base[o]) if buying else None, "quantity": 1 if buying else None,
                "occurred_at": at, "received_at": at,
            }  # fmt: skip

        _insert(store, Event, events, event)
    finally:
        store.dispose()


def _insert(store: Store, table: Any, n: int, row: Any) -> None:
    for start in range(0, n, CHUNK):
        with store.transaction() as session:
            session.execute(insert(table), [row(k) for k in range(start, min(start + CHUNK, n))])


# Each report runs under a parent of its own, so that its peak RSS is its own and not the
# largest of every child this process started; the parent says both on stderr's last line.
_TIMED = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "subprocess.run(sys.argv[1:], check=True); "
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
    "file=sys.stderr)"
)


def measure(url: str, users: int) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of one report, after checking that it counted every user."""
    report = [str(BIN / "discountctl"), "--db-url", url, "experiments", "report", KEY]
    done = subprocess.run(
        [str(BIN / "python"), "-c", _TIMED, *report, "--output", "json"],
        check=True,
        capture_output=True,
        text=True,
    )
    counted = sum(v["users_assigned"] for v in json.loads(done.stdout)["variants"])
    if counted != users:
        raise click.ClickException(f"the report counted {counted:,} users of {users:,}")
    seconds, peak_kb = done.stderr.splitlines()[-1].split()
    return float(seconds), int(peak_kb) / 1024


def _count(name: str, default: int, least: int, what: str) -> Callable[[F], F]:
    return click.option(
        name, default=default, type=click.IntRange(min=least), show_default=True, help=what
    )


@click.command(help=__doc__)
@_count("--users", 100_000, 1, "Users in the experiment.")
@_count("--offers", 800_000, 1, "Offers logged in all.")
@_count("--events", 1_000_000, 0, "Events of those users.")
@_count("--runs", 3, 1, "Reports timed per store.")
@store_options
def main(users: int, offers: int, events: int, runs: int, pg_url: str, doc: Path) -> None:
    if users > offers:
        raise click.UsageError("--users must not exceed --offers: every user is offered something")
    rows = []
    with contextlib.ExitStack() as stack:
        for name, url in bench_stores(stack, pg_url).items():
            click.echo(f"{name}: storing {offers:,} offers and {events:,} events", err=True)
            fill(url, users, offers, events)
            timed = [measure(url, users) for _ in range(runs)]
            seconds = ", ".join(f"{s:.2f}" for s, _ in timed)
            rows.append(f"| {name} | {events:,} | {seconds} | {max(m for _, m in timed):,.0f} |")
            click.echo(rows[-1], err=True)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = f"""Measured {now} with `python -m bench.report{" --pg-url ..." if pg_url else ""}` \
(`make bench-report`) on {cpu_name()}, Python {platform.python_version()}; the stores are \
local (PostgreSQL on the same cores, default settings).

An experiment of three variants, {users:,} users all offered something, {offers:,} offers and \
{events:,} events of those users (impressions 70%, clicks 15%, carts 10%, purchases 3%, \
redemptions 2%). The figure is `discountctl experiments report KEY --output json` in a process \
of its own, {runs} runs one after the other; no model version is active, so the margin is n/a \
and no item cost is looked up.

| store | events | wall s per run | peak RSS MB |
|---|---:|---|---:|
{chr(10).join(rows)}
"""
    write_section(doc, SECTION, body, keep=NOTES, before="## Soak")
    click.echo(f"wrote {doc} ({SECTION})", err=True)


if __name__ == "__main__":
    main()
