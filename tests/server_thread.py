"""A real discountd (create_server + start on 127.0.0.1:0) with its event loop in a thread, so
tests call it through ordinary blocking stubs. Every test server is one of these. Also: what
a test reads of a call such a server refused."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server.app import DiscountServer, create_server
from server.settings import Settings

T = TypeVar("T")


def bad_requests(error: grpc.RpcError) -> list[error_details_pb2.BadRequest]:
    """The google.rpc.BadRequest details of a refused call, each one unpacked."""
    status = rpc_status.from_call(cast(grpc.Call, error))  # a raised RpcError is the call
    assert status is not None, f"no google.rpc.Status details: {error}"
    found = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad), detail
        found.append(bad)
    return found


class ServerThread:
    def __init__(self, settings: Settings, wait_loaded: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server, self.port = self.call(self._start(settings))
        if wait_loaded:
            self.wait_first_load()
        self.target = f"127.0.0.1:{self.port}"

    @staticmethod
    async def _start(settings: Settings) -> tuple[DiscountServer, int]:
        server, port = create_server(settings)
        await server.start()
        return server, port

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def wait_first_load(self) -> None:
        self.call(self.server.first_load.wait())

    def close(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
