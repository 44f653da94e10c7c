"""Category indices shared by the exporter (which bakes them into the graph) and the server.

The graph's ``category_mask`` has one column per category in this order, so both sides must
derive it the same way from the per-item category names in ``items.json``.
"""

from __future__ import annotations

from collections.abc import Sequence


def category_vocabulary(item_categories: Sequence[str]) -> list[str]:
    """Distinct categories, sorted; "" (items without a category) is a category of its own."""
    return sorted(set(item_categories))
