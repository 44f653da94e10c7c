"""Client auth: every RPC but grpc.health.v1 needs `authorization: Bearer TOKEN` of a client
that `discountctl clients create` made and nobody revoked (deny by default).

The server keeps the active token digests in memory, reloaded from the store every
``interval`` seconds, so a revocation reaches it within one interval. When the store is
unreachable the last list stays in force (like the rule snapshot); a revocation made during
the outage takes effect once the store answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

import grpc
from grpc import aio
from sqlalchemy.exc import SQLAlchemyError

from core.store.clients import active_digests, digest
from core.store.db import Store
from core.store.errors import StoreError
from server.interceptors import Behavior, Continuation, Handler, Interceptor, client_name

log = logging.getLogger(__name__)

AUTH_MODES = ("required", "off")
HEADER = "authorization"
SCHEME = "bearer "
# Health stays open: load balancers and orchestrators probe it without credentials.
OPEN_PREFIX = "/grpc.health.v1.Health/"
HOW_TO_GET_ONE = "an admin creates one with `discountctl clients create NAME`"


class ClientRegistry:
    """The active clients' token digests, refreshed from the store in the background."""

    def __init__(self, store: Store, interval: float) -> None:
        self.store = store
        self.interval = interval
        self._digests: dict[str, str] = {}
        self._error = ""
        self._task: asyncio.Task[None] | None = None

    def load(self) -> None:
        with self.store.transaction() as session:
            self._digests = active_digests(session)
        if self._error:
            log.info("client list fresh again from %s", self.store.masked_url)
        self._error = ""

    def name_for(self, token: str) -> str | None:
        return self._digests.get(digest(token))

    @property
    def count(self) -> int:
        return len(self._digests)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.to_thread(self.load)
            except (StoreError, SQLAlchemyError, OSError) as e:
                message = str(e) if isinstance(e, StoreError) else str(self.store.unavailable(e))
                if message != self._error:
                    log.error("client list not refreshed, keeping the last one: %s", message)
                self._error = message


def bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == HEADER and isinstance(value, str) and value[: len(SCHEME)].lower() == SCHEME:
            return value[len(SCHEME) :].strip()
    return None


class AuthInterceptor(Interceptor):
    """Innermost interceptor: the access log around it records UNAUTHENTICATED calls too."""

    def __init__(self, registry: ClientRegistry) -> None:
        self.registry = registry

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIX):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            return _denied(handler, f"missing `{HEADER}: Bearer TOKEN` metadata; {HOW_TO_GET_ONE}")
        name = self.registry.name_for(token)
        if name is None:
            return _denied(handler, f"unknown or revoked client token; {HOW_TO_GET_ONE}")
        if handler.unary_unary is None:
            return handler
        behavior = cast(Behavior, handler.unary_unary)

        async def as_client(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            client_name.set(name)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            as_client,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _denied(handler: Handler, why: str) -> Any:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""

    async def deny(_request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(deny, **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny, **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(deny, **codec)
    return grpc.stream_stream_rpc_method_handler(deny, **codec)
