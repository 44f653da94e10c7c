"""Helpers for CLI tests: run discountctl in-process against a store, see what it holds."""

from __future__ import annotations

from click.testing import CliRunner, Result
from sqlalchemy import func, select

from admin.cli import cli
from core.store.db import Store
from core.store.tables import Base


def ctl(url: str, *args: str, input: str | None = None) -> Result:
    """discountctl --db-url URL ARGS..., as a user types it (stdin is never a terminal here)."""
    return CliRunner().invoke(
        cli, ["--db-url", url, "--actor", "tester", *args], input=input, catch_exceptions=False
    )


def row_counts(url: str) -> dict[str, int]:
    """Rows per table, audit log included: what "nothing was written" is checked against."""
    store = Store(url)
    try:
        with store.transaction() as s:
            return {
                t.name: int(s.scalar(select(func.count()).select_from(t)) or 0)
                for t in Base.metadata.sorted_tables
            }
    finally:
        store.dispose()


def contents(url: str) -> dict[str, list[str]]:
    """Every row of every table, audit log included: "nothing was written" means this is
    unchanged (counts alone miss an update that changes a row in place)."""
    store = Store(url)
    try:
        with store.transaction() as s:
            return {
                t.name: sorted(repr(tuple(row)) for row in s.execute(select(t)))
                for t in Base.metadata.sorted_tables
            }
    finally:
        store.dispose()
