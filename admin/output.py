"""Output for every command: data on stdout as a table or as JSON, messages on stderr."""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import unicodedata
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
FORMATS = ("table", "json")


def output_option(f: F) -> F:
    return click.option(
        "--output",
        "-o",
        type=click.Choice(FORMATS),
        default="table",
        show_default=True,
        help="table for people, json for scripts (shape documented in docs/ADMIN.md).",
    )(f)


def message(text: str) -> None:
    click.echo(text, err=True)


def updated(kind: str, name: str, version_before: int, version_after: int) -> None:
    """The message after an update: one that changed nothing keeps the version."""
    if version_after == version_before:
        message(f"{kind} {name!r} unchanged (version {version_after})")
    else:
        message(f"updated {kind} {name!r} (version {version_after})")


def echo(text: str) -> None:
    """Data to stdout. A stdout that cannot take it (a full disk, /dev/full) is one line and
    exit 1; a closed pipe (`| head`) stays Click's, which exits quietly."""
    try:
        click.echo(text)
    except OSError as e:
        if e.errno == errno.EPIPE:
            raise
        # The unwritten rest would fail again when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise click.ClickException(f"cannot write the output: {e.strerror or e}") from None


def emit(
    data: dict[str, Any] | list[dict[str, Any]],
    output: str,
    columns: Sequence[str] | None = None,
) -> None:
    """A list is a table with ``columns`` (all keys by default); an object is key: value lines."""
    if output == "json":
        echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    if isinstance(data, dict):
        width = max((len(k) for k in data), default=0)
        for key, value in data.items():
            echo(f"{key.ljust(width)}  {_cell(value)}")
        return
    if not data:
        message("(none)")
        return
    cols = list(columns or data[0].keys())
    rows = [[_cell(row.get(c)) for c in cols] for row in data]
    widths = [max(len(c), *(_width(r[i]) for r in rows)) for i, c in enumerate(cols)]
    echo("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for row in rows:
        echo("  ".join(_pad(v, w) for v, w in zip(row, widths, strict=True)).rstrip())


def _width(text: str) -> int:
    """Columns text takes on a terminal: names may be Chinese (two columns a character) or
    carry combining accents (none), and len() counted both as one, shifting the columns after
    them."""
    return sum(
        0
        if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me", "Cf")
        else 2
        if unicodedata.east_asian_width(c) in ("W", "F")
        else 1
        for c in text
    )


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and math.isfinite(value):
        # The shortest exact form: a budget of 1234567.89 must not read 1.23457e+06.
        return format(Decimal(repr(value)), "f").removesuffix(".0")
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)
