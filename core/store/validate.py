"""Checks shared by the repositories: names and ids that round-trip literally."""

from __future__ import annotations

import re

from core.store.errors import InvalidInput
from core.store.tables import ID_LENGTH, NAME_LENGTH

# Control characters: no id or name holds one (PostgreSQL text cannot even hold NUL).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
# Matched with fullmatch: `$` would also match before a final newline.
KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Priorities live in an INTEGER column: 32 bits on PostgreSQL (SQLite would take 64).
PRIORITY_RANGE = (-(2**31), 2**31 - 1)


def name(kind: str, value: str) -> str:
    """Any printable text (SQL-looking and Unicode included) is stored exactly as given."""
    if not value.strip():
        raise InvalidInput(f"{kind} name must not be empty")
    if value != value.strip():
        raise InvalidInput(f"{kind} name {value!r} has leading or trailing spaces; remove them")
    if len(value) > NAME_LENGTH:
        raise InvalidInput(f"{kind} name is {len(value)} characters; the limit is {NAME_LENGTH}")
    # Not only ASCII controls: line and paragraph separators, zero-width and other invisible
    # characters would make two names that look the same, or break a listing's lines.
    hidden = [c for c in dict.fromkeys(value) if not c.isprintable()]
    if hidden:
        raise InvalidInput(
            f"{kind} name {value!r} contains characters that are not printable "
            f"({', '.join(ascii(c) for c in hidden)}); remove them"
        )
    return value


def key(kind: str, value: str) -> str:
    if not KEY_PATTERN.fullmatch(value):
        raise InvalidInput(
            f"{kind} {value!r} must be 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


def ident(kind: str, value: str) -> str:
    """A shop's user or item id: any text without control characters, as in the catalog."""
    if len(value) > ID_LENGTH:
        # Its start only: a line of a member list can be megabytes long.
        raise InvalidInput(
            f"{kind} {value[:20]!r}... is {len(value)} characters; the limit is {ID_LENGTH}"
        )
    if not value or len(value) > ID_LENGTH or CONTROL_CHARACTERS.search(value):
        raise InvalidInput(
            f"{kind} {value!r} must be 1-{ID_LENGTH} characters without control characters"
        )
    return value


def priority(value: object) -> int:
    low, high = PRIORITY_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"priority must be an integer from {low} to {high}, got {value!r}")
    return value
