"""Replay simulated shoppers through a running discountd, the way a storefront would.

Each shopper asks ``GetOffers`` for their recommendations, sees them (impressions), clicks some,
carts and buys according to the market simulator's true response curve: the shopper's discount
behaviour (never reacts, only to large discounts, buys regardless, graded), the item's price, the
discount the server offered, and a relevance derived from the rank the model gave the item.
At checkout a discounted line's offer token is checked with ``VerifyOffer``. Everything goes back
through ``RecordEvents`` in batches: a redemption (with the offer id) for a line bought at a
discounted price, a purchase for one bought at the base price.

Shoppers are the shop's users plus a share of brand-new visitor ids; a user who comes back keeps
the behaviour of their first visit. All random draws depend only on the seed and the shopper's
position, never on the order calls complete in, and event ids are derived from the same, so an
event a rerun repeats is not recorded twice (its events name the rerun's offers, so the store
answers EVENT_ID_REUSED where it kept the first run's: counted here as already recorded). The
rerun's offers are not all the first run's, though: discountd excludes what that run bought, so
events at other positions are new.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pandas as pd
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.artifact import ArtifactError, current_version_dir
from core.store.db import first_line
from core.store.events import EVENT_ID_REUSED, MAX_BATCH
from discount.v1 import discount_pb2 as pb
from discount.v1 import discount_pb2_grpc as pb_grpc
from trainer.config import MarketConfig
from trainer.data import (
    CORRUPT_COMPRESSED,
    DATASET_NAMES,
    NULL_IDS,
    DataError,
    published_format,
    read_table,
)
from trainer.market import Market, make_market

if TYPE_CHECKING:
    from discount.v1.discount_pb2_grpc import DiscountServiceAsyncStub

# The model's rank stands in for the shopper's true taste (the simulator's standardized
# relevance): the best recommendation is clearly relevant, each further rank a little less.
TOP_RELEVANCE = 1.0
RELEVANCE_PER_RANK = 0.25
UNRANKED_RELEVANCE = -0.5
SHOPPER_PICKS = 4  # its random stream: trainer.market's purposes are 1 to 3
# A shopper clicks up to this many times as often as they buy; every purchase follows a click.
CLICKS_PER_PURCHASE = 4.0
CALL_TIMEOUT_S = 30.0
RECORD_RETRIES = 3
NO_VARIANT = "(none)"


class ReplayError(Exception):
    """A call failed in a way the caller must fix (address, token, server state)."""


@dataclass(frozen=True)
class ReplayConfig:
    target: str
    shoppers: int
    seed: int = 0
    offers_per_shopper: int = 5
    concurrency: int = 8
    new_visitor_share: float = 0.1
    batch_size: int = 500
    token: str | None = None
    # trainer.client_auth.channel_credentials; None means a plaintext channel.
    credentials: grpc.ChannelCredentials | None = None
    wait_s: float = 30.0


@dataclass
class Tally:
    """What the shoppers of one variant saw and did, as this replay drew it."""

    visits: int = 0
    offers: int = 0
    discounted: int = 0
    clicks: int = 0
    purchases: int = 0
    revenue_cents: int = 0
    discount_cents: int = 0


@dataclass
class ReplayResult:
    variants: dict[str, Tally] = field(default_factory=dict)
    users: dict[str, set[str]] = field(default_factory=dict)  # distinct users per variant
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    first_rejection: str = ""


def relevance_of_rank(rank: int) -> float:
    """Relevance (simulator units) of an item the model ranked ``rank`` (1 = best, 0 = unranked)."""
    if rank <= 0:
        return UNRANKED_RELEVANCE
    return max(UNRANKED_RELEVANCE, TOP_RELEVANCE - RELEVANCE_PER_RANK * (rank - 1))


def pick_shoppers(known: Sequence[str], count: int, new_share: float, seed: int) -> list[str]:
    """``count`` shopper ids in a seeded order: about ``new_share`` brand-new visitors, the rest
    known users, each once before any comes back for another visit."""
    rng = np.random.default_rng([seed, SHOPPER_PICKS])  # not [seed, 0]: the market's stream
    n_new = round(count * new_share) if known else count
    n_known = count - n_new
    rounds = -(-n_known // len(known)) if known else 0
    picks = [int(i) for _ in range(rounds) for i in rng.permutation(len(known))][:n_known]
    shoppers = [known[i] for i in picks]
    shoppers += [f"visitor-s{seed}-{i:06d}" for i in range(n_new)]
    return [shoppers[i] for i in rng.permutation(len(shoppers))]


def shopper_rows(shoppers: Sequence[str]) -> list[int]:
    """The market row of each shopper visit: a user who comes back is the same shopper, with the
    discount behaviour and price sensitivity of their first visit's row."""
    first: dict[str, int] = {}
    return [first.setdefault(user, k) for k, user in enumerate(shoppers)]


def shopper_events(
    market: Market,
    seed: int,
    index: int,
    row: int,
    user: str,
    reply: pb.GetOffersResponse,
) -> tuple[list[pb.Event], Tally]:
    """The events visit ``index`` produces on these offers, by the shopper in ``row`` of the
    market (shopper_rows)."""
    offers = [o for o in reply.offers if o.offer_id]  # an item without a price gets no offer
    tally = Tally(visits=1, offers=len(offers))
    if not offers:
        return [], tally
    n = len(offers)
    p_buy = market.response(
        np.full(n, row),
        np.array([relevance_of_rank(o.rank) for o in offers]),
        np.array([o.base_price_cents / 100 for o in offers]),
        np.array([o.discount_percent / 100 for o in offers]),
    )
    p_click = np.minimum(1.0, CLICKS_PER_PURCHASE * p_buy)
    draws = np.random.default_rng([seed, 1, index]).random(n)  # one draw: buying implies a click
    events: list[pb.Event] = []
    for pos, (offer, draw) in enumerate(zip(offers, draws, strict=True)):
        base = f"replay-s{seed}-{index}-{pos}"
        discounted = offer.final_price_cents < offer.base_price_cents
        tally.discounted += discounted
        events.append(_event(f"{base}-impression", pb.EVENT_TYPE_IMPRESSION, user, offer))
        if draw >= p_click[pos]:
            continue
        tally.clicks += 1
        events.append(_event(f"{base}-click", pb.EVENT_TYPE_CLICK, user, offer))
        if draw >= p_buy[pos]:
            continue
        events.append(_event(f"{base}-cart", pb.EVENT_TYPE_ADD_TO_CART, user, offer))
        kind = pb.EVENT_TYPE_REDEMPTION if discounted else pb.EVENT_TYPE_PURCHASE
        name = "redemption" if discounted else "purchase"
        events.append(_event(f"{base}-{name}", kind, user, offer, offer.final_price_cents))
        tally.purchases += 1
        tally.revenue_cents += offer.final_price_cents
        tally.discount_cents += offer.base_price_cents - offer.final_price_cents
    return events, tally


def _event(
    event_id: str, kind: pb.EventType.ValueType, user: str, offer: pb.Offer, revenue: int = 0
) -> pb.Event:
    return pb.Event(
        event_id=event_id,
        type=kind,
        user_id=user,
        item_id=offer.item_id,
        offer_id=offer.offer_id,
        revenue_cents=revenue,
        quantity=1 if revenue else 0,
    )


def _add(total: Tally, one: Tally) -> None:
    for name in Tally.__dataclass_fields__:
        setattr(total, name, getattr(total, name) + getattr(one, name))


def _channel(config: ReplayConfig) -> grpc.aio.Channel:
    if config.credentials is None:
        return grpc.aio.insecure_channel(config.target)
    return grpc.aio.secure_channel(config.target, config.credentials)


async def _wait_until_serving(channel: grpc.aio.Channel, config: ReplayConfig) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.wait_s
    last = "no answer"
    while True:
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as e:
            last = f"{e.code().name}: {e.details()}"
        if loop.time() >= deadline:
            raise ReplayError(
                f"{config.target} not SERVING after {config.wait_s:.0f}s ({last}); "
                "is discountd running there?"
            )
        await asyncio.sleep(0.2)


class _Replay:
    def __init__(
        self,
        config: ReplayConfig,
        shoppers: list[str],
        stub: DiscountServiceAsyncStub,
        progress: Callable[[int, int], None],
    ) -> None:
        self.config = config
        self.shoppers = shoppers
        self.stub = stub
        self.progress = progress
        self.metadata = (("authorization", f"Bearer {config.token}"),) if config.token else ()
        # One simulated population, one row per shopper: their discount behaviour and price
        # sensitivity. Its catalog is unused; the shop's items come from discountd.
        self.market = make_market(MarketConfig(n_users=len(shoppers), n_items=1, seed=config.seed))
        self.rows = shopper_rows(shoppers)
        self.result = ReplayResult()
        self.pending: list[pb.Event] = []
        self.done = 0
        self.next = 0

    async def run(self) -> ReplayResult:
        workers = min(self.config.concurrency, len(self.shoppers))
        await asyncio.gather(*(self._worker() for _ in range(workers)))
        while self.pending:
            await self._send(self._take())
        return self.result

    async def _worker(self) -> None:
        size = min(self.config.batch_size, MAX_BATCH)
        while self.next < len(self.shoppers):
            index, self.next = self.next, self.next + 1
            await self._shop(index)
            if len(self.pending) >= size:
                await self._send(self._take())

    async def _shop(self, index: int) -> None:
        user = self.shoppers[index]
        request = pb.GetOffersRequest(user_id=user, limit=self.config.offers_per_shopper)
        try:
            reply = await self.stub.GetOffers(
                request, metadata=self.metadata, timeout=CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            raise ReplayError(self._failure("GetOffers", user, e)) from None
        events, tally = shopper_events(
            self.market, self.config.seed, index, self.rows[index], user, reply
        )
        tokens = {o.offer_id: o.offer_token for o in reply.offers}
        for line in events:
            if line.type == pb.EVENT_TYPE_REDEMPTION:
                await self._checkout(line, tokens[line.offer_id])
        self.pending.extend(events)
        variant = reply.variant or NO_VARIANT
        _add(self.result.variants.setdefault(variant, Tally()), tally)
        self.result.users.setdefault(variant, set()).add(user)
        self.done += 1
        self.progress(self.done, len(self.shoppers))

    async def _checkout(self, line: pb.Event, token: str) -> None:
        """Verify the offer token as a checkout must before it charges the discounted price."""
        try:
            verdict = await self.stub.VerifyOffer(
                pb.VerifyOfferRequest(offer_token=token),
                metadata=self.metadata,
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as e:
            raise ReplayError(self._failure("VerifyOffer", line.user_id, e)) from None
        honoured = verdict.validity == pb.OFFER_VALIDITY_VALID and (
            verdict.user_id,
            verdict.item_id,
            verdict.final_price_cents,
        ) == (line.user_id, line.item_id, line.revenue_cents)
        if not honoured:
            raise ReplayError(
                f"{self.config.target}: VerifyOffer refused offer {line.offer_id} issued moments "
                f"ago to {line.user_id!r} ({pb.OfferValidity.Name(verdict.validity)}, "
                f"{verdict.item_id!r} at {verdict.final_price_cents} cents); check the offer key "
                "and --offer-ttl of discountd"
            )

    def _take(self) -> list[pb.Event]:
        size = min(self.config.batch_size, MAX_BATCH)
        batch, self.pending = self.pending[:size], self.pending[size:]
        return batch

    async def _send(self, batch: list[pb.Event]) -> None:
        for attempt in range(RECORD_RETRIES + 1):
            try:
                reply = await self.stub.RecordEvents(
                    pb.RecordEventsRequest(events=batch),
                    metadata=self.metadata,
                    timeout=CALL_TIMEOUT_S,
                )
                break
            except grpc.aio.AioRpcError as e:
                # Nothing of a refused batch was stored and ids make a resend safe.
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == RECORD_RETRIES:
                    raise ReplayError(self._failure("RecordEvents", None, e)) from None
                await asyncio.sleep(0.5 * 2**attempt)
        for r in reply.results:
            if r.status == pb.EVENT_STATUS_ACCEPTED:
                self.result.accepted += 1
            elif r.status == pb.EVENT_STATUS_DUPLICATE or r.reason.startswith(EVENT_ID_REUSED):
                # A rerun's events carry this run's offer ids, not the first run's: the store
                # keeps the first run's events under these ids, as for any resend.
                self.result.duplicate += 1
            else:
                self.result.rejected += 1
                self.result.first_rejection = self.result.first_rejection or (
                    f"{r.event_id}: {r.reason}"
                )

    def _failure(self, method: str, user: str | None, e: grpc.aio.AioRpcError) -> str:
        code = e.code()
        about = f" for user {user!r}" if user else ""
        hint = ""
        if code == grpc.StatusCode.UNAUTHENTICATED:
            hint = "; pass --token TOKEN"
        elif code == grpc.StatusCode.UNAVAILABLE:
            hint = "; is discountd running there, with a store (--db-url)?"
        return f"{self.config.target}: {method}{about}: {code.name}: {e.details()}{hint}"


async def replay(
    config: ReplayConfig,
    known_users: Sequence[str],
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> ReplayResult:
    """Replay ``config.shoppers`` shoppers against discountd at ``config.target``."""
    shoppers = pick_shoppers(known_users, config.shoppers, config.new_visitor_share, config.seed)
    async with _channel(config) as channel:
        await _wait_until_serving(channel, config)
        stub = pb_grpc.DiscountServiceStub(channel)
        return await _Replay(config, shoppers, stub, progress).run()


def read_users(path: Path) -> list[str]:
    """Distinct user ids, in order of first appearance, from an interactions file (CSV or
    Parquet with a ``user_id`` column) or from the model store's current version."""
    try:
        if path.is_dir():
            users: list[str] = json.loads((current_version_dir(path) / "users.json").read_text())
            return users
        # Read as fit reads it, or a user the model knows as "17" (a Parquet column of floats)
        # or "0042" (" 0042 " in the file) would shop here as a new visitor.
        ids = read_table(path, ("user_id",), ids=("user_id",))["user_id"].str.strip()
    except FileNotFoundError:
        raise ReplayError(f"{path}: no such file") from None
    except DataError as e:
        reason = str(e).removeprefix(f"{path}: ")
        found = published_format(path)
        hint = (
            f"; it is {DATASET_NAMES[found]} as published: give --users-from the model store "
            f"that `discount-train fit --format {found}` wrote, whose users are the ids as "
            "discountd knows them"
            if found
            else ""
        )
        raise ReplayError(f"{path}: cannot read user ids ({reason}){hint}") from None
    except (ArtifactError, OSError, ValueError, KeyError, *CORRUPT_COMPRESSED) as e:
        raise ReplayError(f"{path}: cannot read user ids ({first_line(e)})") from None
    users = [str(u) for u in pd.unique(ids[~ids.str.lower().isin(NULL_IDS)])]
    if not users:
        raise ReplayError(
            f"{path}: no user ids, so every shopper would be a new visitor; pass the shop's "
            "interactions or model store"
        )
    return users


def format_table(result: ReplayResult) -> str:
    header = (
        "variant", "users", "visits", "offers", "discounted", "clicks", "purchases", "revenue",
        "discount_given",
    )  # fmt: skip
    rows: list[tuple[str, ...]] = [header]
    for name, t in sorted(result.variants.items()):
        counts = (len(result.users[name]), t.visits, t.offers, t.discounted, t.clicks, t.purchases)
        money = (t.revenue_cents / 100, t.discount_cents / 100)
        rows.append((name, *(f"{c:,}" for c in counts), *(f"{m:,.2f}" for m in money)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows
    )
