"""`discountctl events ...`: the storefront events discountd stored, for the next model."""

from __future__ import annotations

import csv
import json
import os
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import TextIO

import click

from admin.app import App
from admin.options import parse_time
from admin.output import emit, message, output_option
from core.store.events import interactions

COLUMNS = ("user_id", "item_id", "timestamp", "event", "quantity", "price")
PROGRESS_EVERY = 500_000


@click.group()
def events() -> None:
    """The storefront events discountd stored (RecordEvents)."""


@events.command("export")
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="CSV file to write, in discount-train fit's interactions format; - for stdout. An "
    "existing file is refused.",
)
@click.option("--since", help="Only events that occurred at or after this ISO 8601 time.")
@click.option("--until", help="Only events that occurred before this ISO 8601 time.")
@output_option
@click.pass_obj
def export(app: App, out: Path, since: str | None, until: str | None, output: str) -> None:
    """Write the stored events as interactions for `discount-train fit --interactions`, so the
    next model learns from what shoppers did since the last: purchases and redemptions as
    purchase (price: revenue per unit), clicks as click, add-to-carts as cart, oldest first.
    Impressions are offers shown, not interactions, and are left out; so is a redemption whose
    offer the store does not hold, since it names no item. A user's events of one item, kind and
    price at one time are one row with their quantities summed (fit drops identical rows). Pair
    it with the items file of the current catalog (prices and costs are not in the store).

    \b
    Example:
      discountctl events export --out interactions.csv --since 2026-01-01
      discount-train fit --interactions interactions.csv --items items.csv --out models
    """
    start, end = parse_time(since, "--since"), parse_time(until, "--until")
    if start is not None and end is not None and start >= end:
        raise click.ClickException(f"--since {since} is not before --until {until}")
    if str(out) == "-":
        counts = _write(app, sys.stdout, start, end)
    else:
        if out.exists():
            raise click.ClickException(f"{out} exists; delete it or pick another --out")
        # Written beside its name and renamed once whole: an interrupted export leaves no file
        # that fit would read as the whole history.
        partial = out.with_name(f".{out.name}.partial")
        try:
            with partial.open("w", newline="", encoding="utf-8") as file:
                counts = _write(app, file, start, end)
            os.replace(partial, out)
        except OSError as e:
            raise click.ClickException(f"cannot write {out}: {e.strerror or e}") from None
        finally:
            partial.unlink(missing_ok=True)
    summary = {
        "out": "-" if str(out) == "-" else str(out),
        "interactions": sum(n for kind, n in counts.items() if kind != ""),
        **{kind: counts[kind] for kind in ("purchase", "click", "cart")},
        "left_out_without_item": counts[""],
    }
    if str(out) != "-":
        emit(summary, output)
    elif output == "json":  # stdout holds the CSV
        message(json.dumps(summary))
    else:
        message(f"wrote {summary['interactions']:,} interactions to stdout")
    if counts[""]:
        message(
            f"left out {counts['']:,} redemption(s) whose offer the store does not hold "
            "(no item_id given, and none to look up)"
        )


def _write(app: App, file: TextIO, since: datetime | None, until: datetime | None) -> Counter[str]:
    """Events written per fit event name; "" counts the sales left out for want of an item.

    Events of one user, item, time, kind and unit price are one row with their quantities
    summed: fit drops identical rows as one line copied twice, and a storefront that sends a
    purchase per unit sold, or a click twice in a second, would lose all but one of them."""
    writer = csv.writer(file, lineterminator="\n")
    writer.writerow(COLUMNS)
    counts: Counter[str] = Counter()
    # The rows of the current (user, item, time): (event, price) -> quantity, in order read.
    group: tuple[str, str, datetime] | None = None
    rows: dict[tuple[str, str], int] = {}

    def flush() -> None:
        if group is not None:
            user, item, at = group
            for (event, price), quantity in rows.items():
                writer.writerow((user, item, at.isoformat(), event, quantity, price))
        rows.clear()

    with app.transaction() as session:
        for n, row in enumerate(interactions(session, since, until), start=1):
            if row is None:
                counts[""] += 1
                continue
            if (row.user_id, row.item_id, row.occurred_at) != group:
                flush()
                group = (row.user_id, row.item_id, row.occurred_at)
            price = (
                "" if row.unit_price is None else f"{row.unit_price:.4f}".rstrip("0").rstrip(".")
            )
            rows[row.event, price] = rows.get((row.event, price), 0) + row.quantity
            counts[row.event] += 1
            if n % PROGRESS_EVERY == 0:
                click.echo(f"  {n:,} events read", err=True)
        flush()
    return counts
