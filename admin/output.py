"""Output for every command: data on stdout as a table or as JSON, messages on stderr."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
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


def emit(
    data: dict[str, Any] | list[dict[str, Any]],
    output: str,
    columns: Sequence[str] | None = None,
) -> None:
    """A list is a table with ``columns`` (all keys by default); an object is key: value lines."""
    if output == "json":
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    if isinstance(data, dict):
        width = max((len(k) for k in data), default=0)
        for key, value in data.items():
            click.echo(f"{key.ljust(width)}  {_cell(value)}")
        return
    if not data:
        message("(none)")
        return
    cols = list(columns or data[0].keys())
    rows = [[_cell(row.get(c)) for c in cols] for row in data]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)
