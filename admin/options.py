"""Option decorators and value parsers that several command groups share.

A value that parses but makes no sense is a user error (exit 1), like any refused input; only
a missing or unknown option is a usage error (exit 2).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
# Priorities live in an INTEGER column: 32 bits on PostgreSQL, and SQLite refuses beyond 64.
PRIORITY = click.IntRange(-(2**31), 2**31 - 1)


def yes_option(f: F) -> F:
    return click.option(
        "--yes", "-y", is_flag=True, help="Do it without asking (required without a terminal)."
    )(f)


def if_version_option(f: F) -> F:
    return click.option(
        "--if-version",
        type=int,
        default=None,
        metavar="N",
        help="Refuse the change unless the record is still at version N (from `show`).",
    )(f)


def confirm(question: str, yes: bool) -> None:
    """Ask before a destructive change; never hang waiting for input that cannot come."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.ClickException(
            f"{question} needs confirmation and there is no terminal; pass --yes"
        )
    if not click.confirm(question, err=True):
        raise click.ClickException("cancelled; nothing was changed")


def parse_time(value: str | None, option: str) -> datetime | None:
    """ISO 8601 date or time; a time without a zone is UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.ClickException(
            f"{option}: {value!r} is not an ISO 8601 time, "
            "e.g. 2026-12-01 or 2026-12-01T09:00:00+01:00"
        ) from None
    # In UTC, as the store gives times back: what `create` prints matches `show`.
    return parsed.astimezone(UTC) if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def parse_json(value: str, option: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise click.ClickException(f"{option}: not valid JSON ({e})") from None
    except (ValueError, RecursionError) as e:  # a number of over 4300 digits; nesting too deep
        raise click.ClickException(f"{option}: JSON the store cannot take ({e})") from None


def parse_pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    """NAME=VALUE pairs, the values kept exactly as typed."""
    out: dict[str, str] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise click.ClickException(f"{option}: {item!r} is not NAME=VALUE")
        out[name] = raw
    return out


def parse_assignments(values: tuple[str, ...], option: str) -> dict[str, Any]:
    """NAME=VALUE pairs; a value that reads as JSON (15, 2.5, [5,10]) is taken as such."""
    out: dict[str, Any] = {}
    for name, raw in parse_pairs(values, option).items():
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out
