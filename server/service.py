"""The DiscountService servicer: proto in, domain call, proto out. The one place where domain
errors become gRPC status codes."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from core import offer_token
from core.store.events import MAX_BATCH, EventIn, Verdict
from discount.v1 import discount_pb2 as pb
from discount.v1 import discount_pb2_grpc as pb_grpc
from server.batching import Batcher
from server.errors import (
    FieldViolation,
    InvalidRequest,
    NotReady,
    Overloaded,
    StoreDown,
    StoreRefused,
)
from server.limits import (
    MAX_ERROR_BYTES,
    MAX_VIOLATION_BYTES,
    MAX_VIOLATIONS,
    shorten,
)
from server.metrics import Metrics
from server.offering import Offering
from server.offers import OffersQuery, get_offers
from server.offers import validate as validate_offers
from server.recommend import (
    ColdStart,
    Recommendation,
    RecommendQuery,
    plan,
    recommend,
    validate,
)
from server.versions import ModelStore

Context = aio.ServicerContext[Any, Any]
Request = TypeVar("Request")
Response = TypeVar("Response")
Method = Callable[[Any, Request, Context], Awaitable[Response]]

COLD_START = {
    ColdStart.NONE: pb.COLD_START_UNSPECIFIED,
    ColdStart.FOLD_IN: pb.COLD_START_FOLD_IN,
    ColdStart.POPULARITY: pb.COLD_START_POPULARITY,
}
EVENT_TYPES = {
    pb.EVENT_TYPE_IMPRESSION: "impression",
    pb.EVENT_TYPE_CLICK: "click",
    pb.EVENT_TYPE_ADD_TO_CART: "add_to_cart",
    pb.EVENT_TYPE_PURCHASE: "purchase",
    pb.EVENT_TYPE_REDEMPTION: "redemption",
}
EVENT_STATUS = {
    Verdict.ACCEPTED: pb.EVENT_STATUS_ACCEPTED,
    Verdict.DUPLICATE: pb.EVENT_STATUS_DUPLICATE,
    Verdict.REJECTED: pb.EVENT_STATUS_REJECTED,
}
VALIDITY = {
    offer_token.TokenStatus.VALID: pb.OFFER_VALIDITY_VALID,
    offer_token.TokenStatus.TAMPERED: pb.OFFER_VALIDITY_TAMPERED,
    offer_token.TokenStatus.EXPIRED: pb.OFFER_VALIDITY_EXPIRED,
}
MAX_TOKEN_CHARS = 4096


def rpc(method: Method[Request, Response]) -> Method[Request, Response]:
    """Every call of the service: refused at once past the cap of calls in flight, and domain
    errors turned into status codes with details a caller can act on.

    The cap is counted here rather than by gRPC's ``maximum_concurrent_rpcs``, which counts
    health probes too: at it a load balancer's probe was refused, and a server that was only
    busy was taken for dead (server.limits ``PROBE_SLOTS``). Here rather than in an
    interceptor of its own, which would add an await to every call, health checks included."""

    @functools.wraps(method)
    async def mapped(self: DiscountService, request: Request, context: Context) -> Response:
        if self.in_flight >= self.max_in_flight:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_in_flight} calls in flight already; retry with backoff",
            )
        self.in_flight += 1  # on the event loop only: no lock needed
        try:
            return await method(self, request, context)
        except InvalidRequest as e:
            details = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=shorten(v.field, MAX_VIOLATION_BYTES),
                        description=shorten(v.description, MAX_VIOLATION_BYTES),
                    )
                    for v in e.violations[:MAX_VIOLATIONS]
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(details)
            status = rpc_status.to_status(
                status_pb2.Status(
                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                    message=shorten(str(e), MAX_ERROR_BYTES),
                    details=[packed],
                )
            )
            # Given trailing metadata of its own, abort drops what was set (the request id).
            trailing = (*status.trailing_metadata, *context.trailing_metadata())
            await context.abort(status.code, status.details, trailing)
        except (NotReady, StoreDown) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, shorten(str(e), MAX_ERROR_BYTES))
        except Overloaded as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except StoreRefused as e:
            await context.abort(grpc.StatusCode.INTERNAL, shorten(str(e), MAX_ERROR_BYTES))
        finally:
            self.in_flight -= 1

    return mapped


class DiscountService(pb_grpc.DiscountServiceServicer):
    def __init__(
        self,
        store: ModelStore,
        requested_device: str,
        offering: Offering | None,
        metrics: Metrics,
        batcher: Batcher | None,
        max_in_flight: int,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._metrics = metrics
        self._batcher = batcher
        self._store = store
        self._requested_device = requested_device
        self._offering = offering

    def _require_offering(self) -> Offering:
        if self._offering is None:
            raise NotReady(
                "this server was started without a store (--db-url); it serves Recommend only"
            )
        return self._offering

    def _bought(self, user_id: str) -> frozenset[str]:
        """What the store holds the user bought since the model's data ended (server.purchases)."""
        return self._offering.purchases.of(user_id) if self._offering else frozenset()

    @rpc
    async def Recommend(
        self, request: pb.RecommendRequest, context: Context
    ) -> pb.RecommendResponse:
        query = RecommendQuery(
            user_id=request.user_id,
            limit=request.limit,
            exclude_item_ids=list(request.exclude_item_ids),
            recent_item_ids=list(request.recent_item_ids),
            categories=list(request.categories),
            include_purchased=request.include_purchased,
            bought=self._bought(request.user_id),
        )
        if self._store.current is None:
            validate(query, None)  # a bad request is INVALID_ARGUMENT even before a model is
        model = self._store.require()  # plan() below validates against it, categories too
        if self._batcher is not None:
            planned = plan(model, query)
            result = (
                planned
                if isinstance(planned, Recommendation)
                else await self._batcher.recommend(model, planned)
            )
        else:
            # ONNX Runtime releases the GIL; a worker thread keeps the event loop answering.
            result = await asyncio.to_thread(recommend, model, query)
            if result.cold_start is not ColdStart.POPULARITY:  # a popularity answer runs no model
                self._metrics.batch_size.observe(1)
        response = pb.RecommendResponse(
            model_version=result.model_version,
            cold_start=result.cold_start is not ColdStart.NONE,
            cold_start_path=COLD_START[result.cold_start],
        )
        add = response.items.add  # in place, as in GetOffers
        for rank, item in enumerate(result.items, start=1):
            add(item_id=item.item_id, score=item.score, rank=rank, category=item.category)
        return response

    @rpc
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        model = self._store.require()
        manifest = model.manifest
        keeper = self._offering.keeper if self._offering is not None else None
        return pb.GetModelInfoResponse(
            snapshot_fresh=keeper is not None and keeper.fresh,
            snapshot_age_seconds=keeper.age_seconds if keeper is not None else 0.0,
            store_error=(keeper.error if keeper is not None else "started without --db-url"),
            model_version=manifest.version,
            provider=model.provider,
            item_count=manifest.n_items,
            user_count=manifest.n_users,
            metrics=manifest.metrics,
            created_at=manifest.created_at,
            requested_device=self._requested_device,
        )

    @rpc
    async def GetOffers(
        self, request: pb.GetOffersRequest, context: Context
    ) -> pb.GetOffersResponse:
        query = OffersQuery(
            user_id=request.user_id,
            item_ids=list(request.item_ids),
            limit=request.limit,
            context=dict(request.context),
            bought=self._bought(request.user_id),
        )
        validate_offers(query)
        offering = self._require_offering()
        model = self._store.require()
        snapshot = offering.keeper.require()
        # In a worker thread: every call runs model.onnx over the whole catalog (to rank named
        # items too), which ONNX Runtime does without the GIL; on the event loop it held every
        # other call (one process: 191 -> 291 calls/s, docs/BENCHMARKS.md). The version's facts
        # were read when it loaded.
        result = await asyncio.to_thread(
            get_offers, model, snapshot, query, offering.keys, offering.ttl, offering.respond
        )
        offering.log.append(result.log_rows)
        # Issued: signed and logged. An item the catalog has no price for comes back without
        # an offer id or token.
        self._metrics.offers.inc(len(result.log_rows))
        self._metrics.discount_cents.inc(
            sum(o.base_price_cents - o.final_price_cents for o in result.offers if o.offer_id)
        )
        response = pb.GetOffersResponse(
            segment=result.segment,
            experiment_key=result.experiment_key,
            variant=result.variant,
            model_version=result.model_version,
        )
        # add() on the repeated field builds each Offer in place: half the CPU of constructing
        # pb.Offer objects and a list for the response to copy (docs/BENCHMARKS.md).
        add = response.offers.add
        for o in result.offers:
            add(
                item_id=o.item_id,
                base_price_cents=o.base_price_cents,
                discount_percent=o.discount_percent,
                final_price_cents=o.final_price_cents,
                rule_id=o.rule_id,
                reason_codes=o.reason_codes,
                offer_id=o.offer_id,
                offer_token=o.offer_token,
                expires_at=o.expires_at,
                rank=o.rank,
            )
        return response

    @rpc
    async def RecordEvents(
        self, request: pb.RecordEventsRequest, context: Context
    ) -> pb.RecordEventsResponse:
        if len(request.events) > MAX_BATCH:
            raise InvalidRequest(
                [
                    FieldViolation(
                        "events",
                        f"at most {MAX_BATCH} per call, got {len(request.events)}; split it",
                    )
                ]
            )
        offering = self._require_offering()
        batch = [
            EventIn(
                event_id=e.event_id,
                type=EVENT_TYPES.get(e.type, ""),
                user_id=e.user_id,
                item_id=e.item_id,
                offer_id=e.offer_id,
                revenue_cents=e.revenue_cents,
                quantity=e.quantity,
                occurred_at=e.occurred_at,
            )
            for e in request.events
        ]
        # A store-write thread: the event loop keeps answering while the store commits.
        outcomes, sold = await offering.writes.run(lambda: offering.record_events(batch))
        for user_id, item_id in sold:
            offering.purchases.add(user_id, item_id)  # stored: excluded at once
        for outcome in outcomes:
            self._metrics.events.labels(outcome.verdict.value).inc()
        return pb.RecordEventsResponse(
            results=[
                pb.EventResult(event_id=o.event_id, status=EVENT_STATUS[o.verdict], reason=o.reason)
                for o in outcomes
            ]
        )

    @rpc
    async def VerifyOffer(
        self, request: pb.VerifyOfferRequest, context: Context
    ) -> pb.VerifyOfferResponse:
        token = request.offer_token
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise InvalidRequest(
                [
                    FieldViolation(
                        "offer_token",
                        f"required, at most {MAX_TOKEN_CHARS} characters, as GetOffers issued it",
                    )
                ]
            )
        offering = self._require_offering()
        verdict = offer_token.verify(token, offering.keys, datetime.now(UTC))
        claims = verdict.claims
        if claims is None:
            return pb.VerifyOfferResponse(validity=VALIDITY[verdict.status])
        return pb.VerifyOfferResponse(
            validity=VALIDITY[verdict.status],
            offer_id=claims.offer_id,
            user_id=claims.user_id,
            item_id=claims.item_id,
            final_price_cents=int((claims.final_price * 100).to_integral_value()),
            expires_at=claims.expires_at.isoformat(),
        )
