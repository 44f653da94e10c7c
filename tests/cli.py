"""Helpers for CLI tests: run discountctl in-process against a store, see what it holds; race
several discountctl processes."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass

from click.testing import CliRunner, Result
from sqlalchemy import Connection, func, select, text

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


DISCOUNTCTL = "from admin.cli import main; main()"


@dataclass(frozen=True)
class Run:
    exit_code: int
    stdout: str
    stderr: str


def race(url: str, *commands: tuple[str, ...]) -> list[Run]:
    """Admins at the same moment, for certain rather than likely: the commands (discountctl
    argument lists, each a process of its own) against a PostgreSQL store at url, started in
    turn while a connection holds the audit log's table lock, so that each runs up to its audit
    row, or to a lock the ones before it hold, and waits there before the next starts; then the
    lock goes and they all go on."""
    store = Store(url)
    try:
        with store.engine.connect() as holder, store.engine.connect() as watcher:
            holder.execute(text("LOCK TABLE audit_log IN EXCLUSIVE MODE"))
            runs = []
            for n, args in enumerate(commands, start=1):
                runs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", DISCOUNTCTL, "--db-url", url, *args],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                )
                _wait_for_waiting(watcher, n)
            holder.rollback()
        done = []
        for run in runs:
            out, err = run.communicate(timeout=60)
            done.append(Run(run.returncode, out, err))
        return done
    finally:
        store.dispose()


def _wait_for_waiting(watcher: Connection, n: int) -> None:
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        waiting = watcher.execute(query).scalar_one()
        watcher.rollback()
        if waiting >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{n} discountctl command(s) never waited on the store")
