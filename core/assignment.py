"""Experiment assignment: a deterministic hash of (salt, user id) into buckets, then a variant.

The server and ``discountctl experiments assign`` both call this module, so a user sees the same
variant on every replica, after every restart, and in the admin's answer. A `randomized` rule's
draw is hashed the same way (draw_index), under a secret key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

BUCKETS = 10_000
WEIGHT_TOTAL = 100


class WeightsError(ValueError):
    """Variant weights that cannot split traffic: not integers in [0, 100] summing to 100."""


def check_weights(weights: Sequence[int]) -> None:
    if not weights:
        raise WeightsError("an experiment needs at least one variant")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= WEIGHT_TOTAL:
            raise WeightsError(f"variant weights must be integers in [0, 100], got {w!r}")
    total = sum(weights)
    if total != WEIGHT_TOTAL:
        raise WeightsError(f"variant weights must sum to 100, got {total}")


def bucket(salt: str, user_id: str) -> int:
    """The user's bucket in [0, BUCKETS).

    A NUL separates salt and id, so that ("a:", "b") and ("a", ":b") hash differently.
    """
    digest = hashlib.sha256(salt.encode() + b"\x00" + user_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def variant_index(salt: str, user_id: str, weights: Sequence[int]) -> int:
    """Index of the variant whose share of the buckets holds the user's bucket.

    Variant i owns buckets [sum(w[:i]), sum(w[:i+1])) * BUCKETS/100; weights must pass
    check_weights, so every bucket has exactly one owner.
    """
    check_weights(weights)
    b = bucket(salt, user_id)
    upper = 0
    for i, w in enumerate(weights):
        upper += w * (BUCKETS // WEIGHT_TOTAL)
        if b < upper:
            return i
    raise AssertionError("weights summing to 100 cover every bucket")


def draw_index(key: bytes, rule_id: int, user_id: str, item_id: str, n: int) -> int:
    """A `randomized` rule's draw for one offer, an index in [0, n): HMAC-SHA256 under key of
    (rule, user, item), so a shopper who asks again, at any time and on any replica, sees the
    same discount rather than a new draw to pick the largest from (which would also log the
    sale under the largest of several draws). Each index is equally likely (to 2^-64) and,
    without the key, unpredictable. NULs separate the parts, as in bucket."""
    message = b"\x00".join((b"draw", str(rule_id).encode(), user_id.encode(), item_id.encode()))
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") % n
