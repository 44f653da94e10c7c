"""Interceptors, outermost first: request id, then access log, then auth (server.auth).

Only unary-unary methods (the DiscountService API) are wrapped; health Watch and reflection
streams pass through untouched.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

import grpc
from grpc import aio

from server.limits import MAX_REQUEST_ID_CHARS
from server.logs import request_id
from server.metrics import Metrics

log = logging.getLogger("discountd.access")

REQUEST_ID_HEADER = "x-request-id"
# The authenticated calling service (server.auth sets it); "-" when auth is off or denied.
# Logs and metrics label calls by it.
client_name: ContextVar[str] = ContextVar("client_name", default="-")

Behavior = Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]
if TYPE_CHECKING:  # grpc's classes are generic only in its type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    Interceptor = aio.ServerInterceptor
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]


def _wrap(handler: Handler | None, wrapper: Callable[[Behavior], Behavior]) -> Any:
    if handler is None or handler.unary_unary is None:
        return handler
    return grpc.unary_unary_rpc_method_handler(
        wrapper(cast(Behavior, handler.unary_unary)),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class RequestIdInterceptor(Interceptor):
    """Take the caller's x-request-id (cut to MAX_REQUEST_ID_CHARS: it rides along with error
    statuses, server.limits) or make one, expose it to logs, echo it back in the
    trailing metadata, which goes out with the answer and with any error status. As a header
    it took a send of its own before the answer: about a tenth of the server's CPU per Check
    or Recommend (docs/BENCHMARKS.md).

    A made id is this process's random prefix and a counter: unique, which is all a request id
    needs, without a call into the kernel's random source per request."""

    def __init__(self) -> None:
        prefix = os.urandom(8).hex()
        self._ids = (f"{prefix}{n:016x}" for n in itertools.count())

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        metadata = dict(handler_call_details.invocation_metadata or ())
        incoming = metadata.get(REQUEST_ID_HEADER)

        def wrapper(behavior: Behavior) -> Behavior:
            async def with_request_id(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                rid = str(incoming)[:MAX_REQUEST_ID_CHARS] if incoming else next(self._ids)
                request_id.set(rid)
                context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
                return await behavior(request, context)

            return with_request_id

        return _wrap(await continuation(handler_call_details), wrapper)


class AccessLogInterceptor(Interceptor):
    """Per call: a structured log line (debug when OK, always otherwise) and the request metrics.

    The line carries method, code, ms and client as record attributes, and request_id as every
    record made during a call does (server.logs writes them as JSON fields); the message
    repeats them for plain-text handlers.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        method = handler_call_details.method
        short = method.rsplit("/", 1)[-1]
        metrics = self.metrics

        def wrapper(behavior: Behavior) -> Behavior:
            async def logged(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                start = time.perf_counter()
                # Without an explicit code: OK on return; a cancelled task (client gone, or
                # shutdown past its grace) is CANCELLED; any other exception becomes UNKNOWN.
                fallback = grpc.StatusCode.UNKNOWN
                try:
                    response = await behavior(request, context)
                    fallback = grpc.StatusCode.OK
                    return response
                except asyncio.CancelledError:
                    fallback = grpc.StatusCode.CANCELLED
                    raise
                finally:
                    seconds = time.perf_counter() - start
                    code = context.code() or fallback
                    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
                    client = client_name.get()
                    metrics.requests.labels(short, name, client).inc()
                    metrics.latency.labels(short).observe(seconds)
                    level = _LEVELS.get(name, logging.INFO)
                    if log.isEnabledFor(level):
                        rid = request_id.get()
                        log.log(
                            level,
                            "%s %s %.1fms request_id=%s client=%s",
                            method,
                            name,
                            seconds * 1000,
                            rid,
                            client,
                            extra={
                                "method": method,
                                "code": name,
                                "ms": round(seconds * 1000, 3),
                                "client": client,
                            },
                        )

            return logged

        return _wrap(await continuation(handler_call_details), wrapper)


# OK is the hot path: one line per call only when debugging. Failures the caller caused are
# worth a line; failures of ours are errors.
_LEVELS = {
    "OK": logging.DEBUG,
    "UNKNOWN": logging.ERROR,
    "INTERNAL": logging.ERROR,
    "DATA_LOSS": logging.ERROR,
    "UNAVAILABLE": logging.WARNING,
}
