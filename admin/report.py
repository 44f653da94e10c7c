"""`discountctl experiments report KEY`: did the discount make money? Per variant, from the
offers the server logged and the events the shop recorded.

Definitions (user level, so that every test compares independent units):
- assigned: distinct users offered something under the variant (GetOffers logs the variant);
- exposed: assigned users with an impression at or after their first offer;
- CTR: exposed users who clicked / exposed users;
- conversion: assigned users who bought (purchase or redemption) after their first offer /
  assigned users;
- revenue per user: revenue of those events / assigned users (zeros count);
- discount cost: Σ (base − final price) × quantity over redemptions of the variant's offers;
- margin per user: (revenue − item cost × quantity − nothing else) / assigned users, with costs
  from the active model version's catalog (n/a without one);
- 30-day repeat rate: converters who bought again on a later day within 30 days of their first
  purchase / converters (only converters whose first purchase is 30 days old count).
Purchases count towards conversion, revenue and margin only while the experiment ran: not
between a pause and the next start, nor after its stop, when other rules or experiments served
its users; a purchase or redemption under the arm's own offer (its treatment) counts whenever
it comes, and so do repeats. Impressions and clicks (exposure, CTR) are not filtered.
The first variant is the control. Rates: Wilson intervals, pooled two-proportion z-tests and
Newcombe intervals of the difference; money: Student/Welch intervals and Welch's t-test;
sample-ratio mismatch: chi-square against the weights (simulated where a variant expects fewer
than 5 users), flagged below p = 0.001.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from admin import stats
from core.artifact import ArtifactError
from core.shop import ShopFacts, load_shop_facts
from core.store.errors import InvalidInput
from core.store.experiments import Experiments
from core.store.model_versions import ModelVersions
from core.store.tables import BUYING, AuditEntry, Event, Experiment, Offer

SRM_ALPHA = 0.001
# Below this many buyers in an arm, normal-approximation p-values are far from exact ones
# (3 of 3 against 0 of 3: the z-test says 0.014, Fisher's exact test 0.10).
FEW_CONVERSIONS = 10
REPEAT_WINDOW = timedelta(days=30)
SEEN = ("impression", "click")  # add_to_cart counts in no figure
STREAM_ROWS = 100_000
Floats = npt.NDArray[np.float64]
MAX_POINTS = 400


@dataclass
class _User:
    first_offer: datetime
    variant: str
    exposed: bool = False
    clicked: bool = False
    revenue: float = 0.0
    cost: float = 0.0
    cost_known: bool = True
    discount: float = 0.0
    purchases: list[datetime] = field(default_factory=list)
    first_purchase: datetime | None = None


@dataclass(frozen=True)
class _Arm:
    """A variant's counts (successes, trials) and per-user money, for tests against control."""

    clicked: tuple[int, int]
    converted: tuple[int, int]
    repeat: tuple[int, int]
    revenue: Floats
    discount: Floats
    margin: Floats | None


def _number(x: float) -> float | None:
    return None if math.isnan(x) else x


def _estimate(e: stats.Estimate) -> dict[str, float | None]:
    return {"value": _number(e.value), "low": _number(e.low), "high": _number(e.high)}


def _comparison(c: stats.Comparison) -> dict[str, Any]:
    return {"difference": _estimate(c.difference), "p_value": _number(c.p_value)}


def _catalog(session: Session) -> ShopFacts | None:
    """The active version's facts: item costs, and which of them the trainer assumed."""
    active = ModelVersions(session).active()
    if active is None:
        return None
    try:
        return load_shop_facts(Path(active.path))
    except ArtifactError:
        return None


def _users(session: Session, key: str) -> dict[str, dict[str, _User]]:
    """variant → user → what the user did after their first offer."""
    first = func.min(Offer.issued_at)
    rows = session.execute(
        select(Offer.variant, Offer.user_id, first)
        .where(Offer.experiment_key == key)
        .group_by(Offer.variant, Offer.user_id)
    )
    users: dict[str, dict[str, _User]] = defaultdict(dict)
    # user → (variant, first offer to the microsecond) of the earliest variant so far.
    owner: dict[str, tuple[str, datetime]] = {}
    for variant, user_id, when in rows:
        # A user whose variant changed (weights edited in a draft) counts where first offered,
        # and only there: the rows come in no particular order.
        if user_id in owner:
            previous, earliest = owner[user_id]
            if earliest <= when:
                continue
            del users[previous][user_id]
        owner[user_id] = (variant or "", when)
        # Events carry whole seconds and offers microseconds: an impression in the same second
        # as the first offer came after it, not before.
        users[variant or ""][user_id] = _User(when.replace(microsecond=0), variant or "")
    return users


Idle = list[tuple[datetime, datetime | None]]


def _idle(session: Session, experiment: Experiment) -> Idle:
    """When the experiment, having run, was not running: from each pause or stop to the next
    start (open to now when none), from its audit trail. Whole seconds, as events carry."""
    moves = session.execute(
        select(AuditEntry.action, AuditEntry.at)
        .where(
            AuditEntry.entity_type == "experiment",
            AuditEntry.entity_id == str(experiment.id),
            AuditEntry.action.in_(("start", "pause", "stop")),
        )
        .order_by(AuditEntry.id)  # as written: `at` is each admin's clock
    )
    idle: Idle = []
    since: datetime | None = None
    for action, at in moves:
        if action == "start" and since is not None:
            idle.append((since, at.replace(microsecond=0)))
            since = None
        elif action != "start" and since is None:
            since = at.replace(microsecond=0) + timedelta(seconds=1)
    if since is not None:
        idle.append((since, None))
    return idle


def _while_running(idle: Idle, t: datetime) -> bool:
    return not any(begin <= t and (end is None or t < end) for begin, end in idle)


def _own_offer(u: _User, user_id: str, offer: tuple[Any, Any, Any], key: str) -> bool:
    """The offer (holder, experiment, variant) a purchase or redemption names is one this
    experiment made to this user under their own variant: another's token, or another
    experiment's or variant's offer, is not this arm's treatment."""
    return offer == (user_id, key, u.variant)


def _in_experiment(key: str) -> ColumnElement[bool]:
    """The event's user was offered something under the experiment."""
    return Event.user_id.in_(select(Offer.user_id).where(Offer.experiment_key == key))


def report(session: Session, key: str, now: datetime) -> dict[str, Any]:
    experiment = Experiments(session).get(key)
    variants = experiment.variants
    names = {v.name for v in variants}
    users = _users(session, key)
    # Users offered under a variant the experiment does not have enter no figure (a warning).
    owner = _known(users, names)
    catalog = _catalog(session)
    costs = catalog.costs if catalog is not None else None
    assumed = catalog.assumed_costs if catalog is not None else frozenset[str]()
    # Purchases in the figures, and how many of them are priced at an assumed cost.
    counted = assumed_purchases = 0
    # Impressions and clicks, most of the events, only matter as "any since the first offer":
    # the store keeps each user's latest of each kind, and only purchases come out one by one.
    seen = session.execute(
        select(Event.user_id, Event.type, func.max(Event.occurred_at))
        .where(_in_experiment(key), Event.type.in_(SEEN))
        .group_by(Event.user_id, Event.type)
    )
    for user_id, kind, latest in seen:
        u = owner.get(user_id)
        if u is None or latest < u.first_offer:
            continue
        if kind == "impression":
            u.exposed = True
        else:
            u.clicked = True
    offer_item = select(
        Offer.offer_id,
        Offer.item_id,
        Offer.user_id,
        Offer.experiment_key,
        Offer.variant,
        (Offer.base_price - Offer.final_price).label("discount"),
    ).subquery()
    events = session.execute(
        select(
            Event.user_id,
            Event.type,
            Event.revenue,
            Event.quantity,
            Event.occurred_at,
            func.coalesce(Event.item_id, offer_item.c.item_id),
            offer_item.c.user_id,
            offer_item.c.experiment_key,
            offer_item.c.variant,
            offer_item.c.discount,
        )
        .outerjoin(offer_item, offer_item.c.offer_id == Event.offer_id)
        .where(_in_experiment(key), Event.type.in_(BUYING))
        .order_by(Event.occurred_at),
        # Streamed (a server-side cursor on PostgreSQL): memory follows the users, not the
        # purchases, which a long experiment has millions of (docs/BENCHMARKS.md).
        execution_options={"yield_per": STREAM_ROWS},
    )
    idle = _idle(session, experiment)
    for user_id, kind, revenue, quantity, occurred, item_id, holder, of, arm, discount in events:
        u = owner.get(user_id)
        if u is None or occurred < u.first_offer:
            continue
        own_offer = _own_offer(u, user_id, (holder, of, arm), key)
        # A sale under the arm's own offer is its treatment whenever it comes: offers outlive a
        # pause or stop by their tokens' lifetime, and counting only redemptions then would
        # credit the discount arms alone (a control's offers are bought as plain purchases).
        if not own_offer and not _while_running(idle, occurred):
            if u.first_purchase is not None:
                u.purchases.append(occurred)  # a repeat is loyalty, whoever served it
            continue
        # Counted like the user's revenue, and only for an offer of this experiment and the
        # user's own variant made to this user: another's token, or an offer of another
        # experiment or variant, would charge an arm for a discount its users were not given.
        if own_offer and kind == "redemption":  # a purchase paid the base price
            u.discount += float(discount or 0.0) * (quantity or 1)
        u.revenue += revenue or 0.0
        cost = costs.get(item_id) if costs is not None and item_id else None
        if cost is None:
            u.cost_known = False
        else:
            u.cost += cost * (quantity or 1)
        counted += 1
        assumed_purchases += item_id in assumed
        u.purchases.append(occurred)
        if u.first_purchase is None:
            u.first_purchase = occurred
    out: list[dict[str, Any]] = []
    buyers: dict[str, int] = {}
    control: _Arm | None = None
    for v in variants:
        group = list(users.get(v.name, {}).values())
        n = len(group)
        exposed = [u for u in group if u.exposed]
        converters = [u for u in group if u.first_purchase is not None]
        eligible = [
            u for u in converters if u.first_purchase and now - u.first_purchase >= REPEAT_WINDOW
        ]
        repeaters = [u for u in eligible if _repeated(u)]
        buyers[v.name] = len(converters)
        revenues = np.array([u.revenue for u in group], dtype=np.float64)
        discounts = np.array([u.discount for u in group], dtype=np.float64)
        margins: Floats | None = (
            np.array([u.revenue - u.cost for u in group], dtype=np.float64)
            if costs is not None and all(u.cost_known for u in group)
            else None
        )
        row: dict[str, Any] = {
            "variant": v.name,
            "weight": v.weight,
            "rules": [r.name for r in v.in_order()],
            "users_assigned": n,
            "users_exposed": len(exposed),
            "ctr": _estimate(stats.proportion(sum(u.clicked for u in exposed), len(exposed))),
            "conversion": _estimate(stats.proportion(len(converters), n)),
            "revenue_per_user": _estimate(stats.mean(revenues)),
            "discount_cost": round(float(discounts.sum()), 2),
            "discount_cost_per_user": _estimate(stats.mean(discounts)),
            "margin_per_user": _estimate(stats.mean(margins)) if margins is not None else None,
            "repeat_rate_30d": _estimate(stats.proportion(len(repeaters), len(eligible))),
        }
        arm = _Arm(
            (sum(u.clicked for u in exposed), len(exposed)),
            (len(converters), n),
            (len(repeaters), len(eligible)),
            revenues,
            discounts,
            margins,
        )
        if control is None:
            control = arm
        else:
            row["vs_control"] = {
                "ctr": _comparison(stats.two_proportion_ztest(*arm.clicked, *control.clicked)),
                "conversion": _comparison(
                    stats.two_proportion_ztest(*arm.converted, *control.converted)
                ),
                "repeat_rate_30d": _comparison(
                    stats.two_proportion_ztest(*arm.repeat, *control.repeat)
                ),
                "revenue_per_user": _comparison(stats.welch_ttest(revenues, control.revenue)),
                "discount_cost_per_user": _comparison(
                    stats.welch_ttest(discounts, control.discount)
                ),
                "margin_per_user": (
                    _comparison(stats.welch_ttest(margins, control.margin))
                    if margins is not None and control.margin is not None
                    else None
                ),
            }
        out.append(row)
    srm = stats.srm_p_value([r["users_assigned"] for r in out], [v.weight for v in variants])
    warnings = []
    unknown = {name: len(group) for name, group in users.items() if group and name not in names}
    if unknown:
        shown = ", ".join(f"{name or '(none)'}: {n}" for name, n in sorted(unknown.items()))
        warnings.append(
            f"{sum(unknown.values())} users were offered under variants this experiment does not "
            f"have ({shown}); they are left out of every figure and of the SRM check"
        )
    shared = _shared_with_other_experiments(session, key)
    if shared:
        warnings.append(
            f"{shared:,} users of this experiment were also offered something under another "
            "experiment (one paused and resumed, or a new model version moving them across "
            "targets): while that one treated them their purchases count here too"
        )
    if not math.isnan(srm) and srm < SRM_ALPHA:
        warnings.append(
            f"sample ratio mismatch: users per variant do not match the weights "
            f"(chi-square p = {srm:.2g} < {SRM_ALPHA}); assignment or logging is broken, "
            "do not trust the comparisons"
        )
    if costs is None:
        warnings.append("margin is n/a: no active model version with item costs in the store")
    else:
        unpriced = [r["variant"] for r in out if r["margin_per_user"] is None]
        if unpriced:
            warnings.append(
                f"margin is n/a for {', '.join(unpriced)}: purchases of items without a cost in "
                "the active model version's catalog (items added since it was trained, or "
                "redemptions naming offers the store does not hold)"
            )
        if assumed_purchases:
            warnings.append(
                f"margin rests on costs the trainer assumed from its --default-margin for "
                f"{assumed_purchases:,} of {counted:,} purchases (of items whose cost the active "
                "model version assumed; a rule's offers of them say COST_ASSUMED): it is only as "
                "right as that margin"
            )
    few = [name for name, n in buyers.items() if n < FEW_CONVERSIONS]
    if few and len(out) > 1:
        warnings.append(
            f"fewer than {FEW_CONVERSIONS} buyers in {', '.join(few)}: the p-values and intervals "
            "rest on normal approximations, which overstate certainty this small; wait for more "
            "data"
        )
    return {
        "experiment": key,
        "status": experiment.status,
        "started_at": experiment.started_at.isoformat() if experiment.started_at else None,
        # Paused or stopped periods, whose purchases are not counted.
        "idle": [[b.isoformat(), e.isoformat() if e else None] for b, e in idle],
        "control": variants[0].name,
        "variants": out,
        "srm_p_value": _number(srm),
        "warnings": warnings,
    }


def _shared_with_other_experiments(session: Session, key: str) -> int:
    """Users offered something under this experiment and under another one. IN over a subquery:
    offers have no user_id index, and SQLite joins them row by row where it builds a temporary
    index for IN."""
    others = select(Offer.user_id).where(
        Offer.experiment_key.is_not(None), Offer.experiment_key != key
    )
    query = select(func.count(func.distinct(Offer.user_id))).where(
        Offer.experiment_key == key, Offer.user_id.in_(others)
    )
    return int(session.scalar(query) or 0)


def _known(users: dict[str, dict[str, _User]], names: set[str]) -> dict[str, _User]:
    """user → their data, for the users of the experiment's own variants."""
    return {u: data for name, group in users.items() if name in names for u, data in group.items()}


def _day(t: datetime) -> int:
    return int(t.timestamp() // 86_400)


def _repeated(u: _User) -> bool:
    """Bought again on a later (UTC) day, so not the same order split into lines, and within
    REPEAT_WINDOW of the first purchase, the window every eligible converter has lived through.
    """
    first = u.first_purchase
    assert first is not None
    return any(_day(t) > _day(first) and t - first <= REPEAT_WINDOW for t in u.purchases)


def conversion_curves(
    session: Session, key: str
) -> dict[str, tuple[list[datetime], list[stats.Estimate]]]:
    """Per variant, at each moment the numbers change: cumulative conversion with its interval
    among the users assigned by then."""
    users = _users(session, key)
    experiment = Experiments(session).get(key)
    variants = [v.name for v in experiment.variants]
    owner = _known(users, set(variants))
    idle = _idle(session, experiment)
    bought: dict[str, datetime] = {}
    # The first purchase at or after the first offer, as report() counts it: while the
    # experiment ran, or under the arm's own offer; a customer who had also bought
    # before the experiment still converts.
    for user_id, occurred, holder, of, arm in session.execute(
        select(
            Event.user_id, Event.occurred_at, Offer.user_id, Offer.experiment_key, Offer.variant,
        )
        .outerjoin(Offer, Offer.offer_id == Event.offer_id)
        .where(_in_experiment(key), Event.type.in_(BUYING))
        .order_by(Event.occurred_at)
    ):  # fmt: skip
        u = owner.get(user_id)
        if u is None or user_id in bought or occurred < u.first_offer:
            continue
        if _own_offer(u, user_id, (holder, of, arm), key) or _while_running(idle, occurred):
            bought[user_id] = occurred
    moments = sorted({d.first_offer for d in owner.values()} | set(bought.values()))
    if not moments:
        return {}
    # Every moment the curves change, thinned to MAX_POINTS for a readable picture.
    picks = np.unique(np.linspace(0, len(moments) - 1, min(len(moments), MAX_POINTS)).astype(int))
    points = [moments[i] for i in picks]
    curves = {}
    for variant in variants:
        group = users.get(variant, {})
        offered = sorted(d.first_offer for d in group.values())
        converted = sorted(bought[u] for u in group if u in bought)
        # Users offered by t, and those of them who bought by t (a purchase follows its offer).
        series = [
            stats.proportion(bisect_right(converted, t), bisect_right(offered, t)) for t in points
        ]
        curves[variant] = (points, series)
    return curves


# The largest unit of which the experiment has lasted at least two: a day-old experiment in
# hours, a demo of seconds in seconds.
AXIS_UNITS = (
    (timedelta(days=1), "days"),
    (timedelta(hours=1), "hours"),
    (timedelta(minutes=1), "minutes"),
    (timedelta(seconds=1), "seconds"),
)


def axis_unit(span: timedelta) -> tuple[timedelta, str]:
    return next((u for u in AXIS_UNITS if span >= 2 * u[0]), AXIS_UNITS[-1])


def plot(session: Session, key: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidInput(
            "--plot needs matplotlib: pip install 'discountd[report]' (or drop --plot)"
        ) from None

    curves = conversion_curves(session, key)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    moments = [t for when, _ in curves.values() for t in when]
    begin = min(moments, default=None)
    span = (max(moments) - begin) if begin is not None else timedelta(0)
    unit, unit_name = axis_unit(span)
    for variant, (when, series) in curves.items():
        assert begin is not None
        x = [(t - begin) / unit for t in when]
        shown = [(t, e) for t, e in zip(x, series, strict=True) if not math.isnan(e.value)]
        if not shown:
            continue
        xs = [t for t, _ in shown]
        line = ax.step(xs, [e.value * 100 for _, e in shown], where="post", label=variant)[0]
        ax.fill_between(
            xs,
            [e.low * 100 for _, e in shown],
            [e.high * 100 for _, e in shown],
            step="post",
            color=line.get_color(),
            alpha=0.2,
        )
    ax.set_title(f"Experiment {key}: cumulative conversion (95% Wilson interval)")
    ax.set_ylabel("users who bought (%)")
    ax.set_xlabel(f"{unit_name} since the first offer")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no offers yet: an empty plot, without a warning
        ax.legend(title="variant")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except ValueError as e:  # matplotlib: a file extension it has no writer for
        raise InvalidInput(f"--plot {path}: {e}") from None
    except OSError as e:
        raise InvalidInput(f"--plot {path}: cannot write it ({e.strerror})") from None
    finally:
        plt.close(fig)
