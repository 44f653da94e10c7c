"""A real discountd built from given Settings (create_server + start on 127.0.0.1:0), its event
loop in a thread, for auth and TLS tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from offer_server import KEY

from core.offer_token import OfferKeys
from server.app import DiscountServer, create_server
from server.settings import Settings

T = TypeVar("T")


def settings(model_dir: Path, db_url: str | None, **changes: Any) -> Settings:
    base = Settings(
        model_dir=model_dir,
        device="cpu",
        host="127.0.0.1",
        port=0,
        poll_interval=0,
        db_url=db_url,
        rules_poll_interval=0.2,
        offer_keys=OfferKeys(KEY),
    )
    return replace(base, **changes)


class ServerThread:
    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server, self.port = self.call(self._start(settings))
        self.call(self.server.first_load.wait())
        self.target = f"127.0.0.1:{self.port}"

    @staticmethod
    async def _start(settings: Settings) -> tuple[DiscountServer, int]:
        server, port = create_server(settings)
        await server.start()
        return server, port

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def close(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
