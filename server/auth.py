"""Client auth: every RPC but grpc.health.v1 needs `authorization: Bearer TOKEN` of a client
that `discountctl clients create` made and nobody revoked (deny by default).

The server keeps the active token digests in memory and reloads them with the rule snapshot
(server.snapshot), in the same transaction: on PostgreSQL at once, because every client change
is audited and the audit notifies, and on any store within --rules-poll-interval. When the
store is unreachable the last list stays in force, like the rules; a revocation made during
the outage takes effect once the store answers again.
"""

from __future__ import annotations

from typing import Any, cast

import grpc
from grpc import aio
from sqlalchemy.orm import Session

from core.store.clients import active_digests, digest
from server.interceptors import Behavior, Continuation, Handler, Interceptor, client_name

AUTH_MODES = ("required", "off")
HEADER = "authorization"
SCHEME = "bearer "
# Health stays open: load balancers and orchestrators probe it without credentials.
OPEN_PREFIX = "/grpc.health.v1.Health/"
HOW_TO_GET_ONE = "an admin creates one with `discountctl clients create NAME`"


class ClientRegistry:
    """The active clients' token digests, replaced whenever the rule snapshot is loaded."""

    def __init__(self) -> None:
        self._digests: dict[str, str] = {}

    def load_from(self, session: Session) -> None:
        self._digests = active_digests(session)

    def name_for(self, token: str) -> str | None:
        return self._digests.get(digest(token))

    @property
    def count(self) -> int:
        return len(self._digests)


def bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == HEADER and isinstance(value, str) and value[: len(SCHEME)].lower() == SCHEME:
            return value[len(SCHEME) :].strip()
    return None


def _no_bearer_token(metadata: Any) -> str:
    """Why a call carries no bearer token: no `authorization` entry, or one without the scheme
    (a bare token, as a caller who reads "token" often sends), which "missing" would misname.
    The entry's value is never echoed: it may well be the token itself."""
    if any(key == HEADER for key, _ in metadata or ()):
        return (
            f"`{HEADER}` metadata must be `Bearer TOKEN`: the word Bearer, a space, then the "
            f"token; {HOW_TO_GET_ONE}"
        )
    return f"missing `{HEADER}: Bearer TOKEN` metadata; {HOW_TO_GET_ONE}"


class AuthInterceptor(Interceptor):
    """Innermost interceptor: the access log around it records UNAUTHENTICATED calls too."""

    def __init__(self, registry: ClientRegistry) -> None:
        self.registry = registry

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler_call_details.method.startswith(OPEN_PREFIX):
            return handler
        # Checked before UNIMPLEMENTED too: without a token, nobody learns which methods exist.
        metadata = handler_call_details.invocation_metadata
        token = bearer_token(metadata)
        if token is None:
            return _denied(handler, _no_bearer_token(metadata))
        name = self.registry.name_for(token)
        if name is None:
            return _denied(handler, f"unknown or revoked client token; {HOW_TO_GET_ONE}")
        if handler is None or handler.unary_unary is None:
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


def _denied(handler: Handler | None, why: str) -> Any:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED; for a method
    that does not exist, a streaming one, which answers a call of any shape and which the access
    log leaves out, so that made-up method names never become metric labels.

    It takes the request as the bytes that came in, never decoded: parsing is the costly part
    of a refused call, and protobuf grows a 4 MiB message of empty repeated entries into
    ~200 MB, which anyone who reaches the port could make the server do over and over.
    """

    async def deny(_request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    if handler is None:
        return grpc.stream_stream_rpc_method_handler(deny)
    codec = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(deny, **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny, **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(deny, **codec)
    return grpc.stream_stream_rpc_method_handler(deny, **codec)
