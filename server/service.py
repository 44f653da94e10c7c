"""The DiscountService servicer: proto in, domain call, proto out. The one place where domain
errors become gRPC status codes."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from discount.v1 import discount_pb2 as pb
from discount.v1 import discount_pb2_grpc as pb_grpc
from server.errors import InvalidRequest, NotReady
from server.recommend import ColdStart, RecommendQuery, recommend, validate
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


def maps_errors(method: Method[Request, Response]) -> Method[Request, Response]:
    """Turn domain errors into status codes with details a caller can act on."""

    @functools.wraps(method)
    async def mapped(self: Any, request: Request, context: Context) -> Response:
        try:
            return await method(self, request, context)
        except InvalidRequest as e:
            details = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in e.violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(details)
            status = rpc_status.to_status(
                status_pb2.Status(
                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                    message=str(e),
                    details=[packed],
                )
            )
            await context.abort(status.code, status.details, status.trailing_metadata)
        except NotReady as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    return mapped


class DiscountService(pb_grpc.DiscountServiceServicer):
    def __init__(self, store: ModelStore, requested_device: str) -> None:
        self._store = store
        self._requested_device = requested_device

    @maps_errors
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
        )
        validate(query, None)
        model = self._store.require()
        # ONNX Runtime releases the GIL; a worker thread keeps the event loop answering.
        result = await asyncio.to_thread(recommend, model, query)
        return pb.RecommendResponse(
            items=[
                pb.RecommendedItem(
                    item_id=item.item_id, score=item.score, rank=rank, category=item.category
                )
                for rank, item in enumerate(result.items, start=1)
            ],
            model_version=result.model_version,
            cold_start=result.cold_start is not ColdStart.NONE,
            cold_start_path=COLD_START[result.cold_start],
        )

    @maps_errors
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        model = self._store.require()
        manifest = model.manifest
        return pb.GetModelInfoResponse(
            model_version=manifest.version,
            provider=model.provider,
            item_count=manifest.n_items,
            user_count=manifest.n_users,
            metrics=manifest.metrics,
            created_at=manifest.created_at,
            requested_device=self._requested_device,
        )
