"""Experiment assignment as the offer pipeline applies it: shares follow the weights, and the
same user gets the same variant in another process (another replica, or after a restart)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from core.assignment import draw_index
from core.offers import ExperimentDef, Snapshot, VariantDef, decide

NOW = datetime(2026, 11, 28, tzinfo=UTC)
# Two to four variants; cut points in [0, 100] give weights that sum to 100.
weights_lists = st.lists(st.integers(0, 100), min_size=1, max_size=3).map(
    lambda cuts: [b - a for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), 100], strict=True)]
)


def snapshot(salt: str, weights: list[int]) -> Snapshot:
    variants = tuple(VariantDef(f"v{i}", w) for i, w in enumerate(weights))
    return Snapshot(experiments=(ExperimentDef("exp", salt, variants),))


@settings(max_examples=4, deadline=None)
@given(salt=st.text(min_size=1, max_size=12), weights=weights_lists, prefix=st.text(max_size=6))
def test_variant_shares_within_a_point_of_weights_over_100k_users(
    salt: str, weights: list[int], prefix: str
) -> None:
    snap = snapshot(salt, weights)
    counts = Counter(decide(snap, f"{prefix}{n}", {}, (), NOW).variant for n in range(100_000))
    for i, w in enumerate(weights):
        assert abs(counts[f"v{i}"] / 1000 - w) < 1.0, (weights, counts)


SCRIPT = """
import json, sys
from datetime import UTC, datetime
from core.offers import ExperimentDef, Snapshot, VariantDef, decide
salt, weights = sys.argv[1], json.loads(sys.argv[2])
variants = tuple(VariantDef(f"v{i}", w) for i, w in enumerate(weights))
snap = Snapshot(experiments=(ExperimentDef("exp", salt, variants),))
now = datetime(2026, 11, 28, tzinfo=UTC)
print(json.dumps([decide(snap, f"user-{n}", {}, (), now).variant for n in range(300)]))
"""


@settings(max_examples=3, deadline=None)
@given(salt=st.text(alphabet="abcxyz-_0123", min_size=1, max_size=12), weights=weights_lists)
def test_same_variants_in_a_fresh_process(salt: str, weights: list[int]) -> None:
    here = [decide(snapshot(salt, weights), f"user-{n}", {}, (), NOW).variant for n in range(300)]
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, salt, json.dumps(weights)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) == here


def test_a_randomized_draw_is_uniform_and_fixed_by_key_rule_user_and_item() -> None:
    key = b"k" * 32
    counts = Counter(draw_index(key, 1, f"user-{u}", "item", 5) for u in range(10_000))
    # 2,000 expected each, standard deviation 40: 250 off is six of them.
    assert sorted(counts) == [0, 1, 2, 3, 4]
    assert all(abs(n - 2_000) < 250 for n in counts.values()), counts
    same = [draw_index(key, 1, f"user-{u}", "item", 5) for u in range(200)]
    assert same == [draw_index(key, 1, f"user-{u}", "item", 5) for u in range(200)]
    for other in (
        [draw_index(b"j" * 32, 1, f"user-{u}", "item", 5) for u in range(200)],
        [draw_index(key, 2, f"user-{u}", "item", 5) for u in range(200)],
        [draw_index(key, 1, f"user-{u}", "other", 5) for u in range(200)],
    ):
        # Independent draws agree about one time in five, never nearly always.
        assert sum(a == b for a, b in zip(same, other, strict=True)) < 80
