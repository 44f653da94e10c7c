"""DiscountService registered with request decoding that refuses what is not protobuf.

The generated registration hands grpc a deserializer that raises on corrupt bytes, and grpc
answers that with UNKNOWN and a logged traceback. Here bytes that do not parse as the request
message answer INVALID_ARGUMENT with one line, like any other malformed request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc import aio

from discount.v1 import discount_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["DiscountService"]
Behavior = Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]


class Undecodable:
    """Stands in for a request whose bytes did not parse; the handler refuses it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _decoder(message: type[Message]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError:
            return Undecodable(
                f"the request body is not a valid {message.DESCRIPTOR.full_name} message "
                "(corrupt protobuf or text that is not UTF-8); send it with the generated stubs"
            )

    return decode


def _refusing(behavior: Behavior) -> Behavior:
    async def handle(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return await behavior(request, context)

    return handle


def add_discount_service(servicer: object, server: aio.Server) -> None:
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            _refusing(getattr(servicer, method.name)),
            request_deserializer=_decoder(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in SERVICE.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
