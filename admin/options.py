"""Option decorators and value parsers that several command groups share.

Exit 2 (a usage error) is Click's: the command line does not parse (an unknown command or
option, a missing argument or option value, a value not of the option's type or not one of its
choices). Everything refused after that is exit 1, like any refused input: a number out of
range, a time or JSON that does not read, a name the store refuses. So options take plain
types (int, not IntRange) and their ranges are checked where the values are used.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from core import json_input

F = TypeVar("F", bound=Callable[..., Any])


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
        raise click.ClickException(f"{question} Not asked: no terminal; pass --yes to confirm")
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
    try:
        # In UTC, as the store gives times back: what `create` prints matches `show`.
        return parsed.astimezone(UTC) if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    except OverflowError:  # e.g. 9999-12-31T23:00-05:00 is in the year 10000 in UTC
        raise click.ClickException(
            f"{option}: {value!r} falls outside the years 1-9999 in UTC; give a time inside them"
        ) from None


class NotJson(click.ClickException):
    """Text that does not parse as JSON at all (parse_assignments keeps it as text)."""


def parse_json(value: str, option: str) -> Any:
    try:
        # A repeated key would silently keep its last value (a 90% discount for a typo).
        parsed = json_input.loads(value)
        # An escape like "\ud800" reads as half a character, which no text encoding holds.
        json.dumps(parsed, ensure_ascii=False).encode()
    except json.JSONDecodeError as e:
        raise NotJson(f"{option}: not valid JSON ({e})") from None
    except json_input.RepeatedKeyError as e:
        raise click.ClickException(f"{option}: {e}") from None
    except (ValueError, RecursionError) as e:  # a number of over 4300 digits; nesting too deep
        raise click.ClickException(f"{option}: JSON the store cannot take ({e})") from None
    return parsed


def parse_pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    """NAME=VALUE pairs, the values kept exactly as typed."""
    out: dict[str, str] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise click.ClickException(f"{option}: {item!r} is not NAME=VALUE")
        if name in out:
            raise click.ClickException(f"{option}: {name!r} is given twice; give it once")
        out[name] = raw
    return out


def parse_assignments(values: tuple[str, ...], option: str) -> dict[str, Any]:
    """NAME=VALUE pairs; a value that reads as JSON (15, 2.5, [5,10]) is taken as such."""
    out: dict[str, Any] = {}
    for name, raw in parse_pairs(values, option).items():
        try:
            out[name] = parse_json(raw, f"{option} {name}")
        except NotJson:
            out[name] = raw
    return out
