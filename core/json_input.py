"""JSON that people give (a command-line value, a manifest they may have edited by hand), read
so that a key given twice is refused: Python's json keeps the last value silently, and a typo
would then decide a discount, or which file a manifest vouches for."""

from __future__ import annotations

import json
from typing import Any


class RepeatedKeyError(ValueError):
    """An object of the document gives one key twice; the message names it."""


def _refuse_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise RepeatedKeyError(f"key {name!r} is given twice; give it once")
        seen.add(name)
    return dict(pairs)


def loads(text: str) -> Any:
    """json.loads, refusing a key repeated in any object at any depth (RepeatedKeyError)."""
    return json.loads(text, object_pairs_hook=_refuse_repeated_keys)
