"""The standard grpc.health.v1 service, with its Watch streams capped.

Health needs no token (load balancers' probes carry none), and a Watch stream holds one of
gRPC's call slots for as long as the caller keeps it open. Uncapped, anyone who reaches the
port could open enough of them to fill gRPC's cap and leave every caller, probes included,
RESOURCE_EXHAUSTED. Capped, and with gRPC's cap sized above the call cap, the probe slots and
this one together (server.app), Watch streams take no slot of a call or a probe. And a Watch
naming a service longer than any the server answers for is refused at once, so that the
streams hold short names rather than up to 4 MiB each.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from server.limits import MAX_HEALTH_SERVICE_CHARS


class CappedHealth(HealthServicer):  # type: ignore[misc]  # grpc_health has no types
    def __init__(self, max_watches: int) -> None:
        super().__init__()
        self.max_watches = max_watches
        self.watching = 0

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        if len(request.service) > MAX_HEALTH_SERVICE_CHARS:
            # Not watched as SERVICE_UNKNOWN: the open stream would hold its request, up to
            # 4 MiB, for as long as the caller pleases. The name is not echoed.
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no health entry has a name over {MAX_HEALTH_SERVICE_CHARS} characters",
            )
        if self.watching >= self.max_watches:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.watching} health Watch streams open already; "
                "retry with backoff, or poll Check",
            )
        self.watching += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watching -= 1
