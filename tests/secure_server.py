"""A real discountd built from given Settings (create_server + start on 127.0.0.1:0), its event
loop in a thread, for auth and TLS tests; settings() is what every test server starts from,
offer_server's OfferServer too."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from server_thread import ServerThread

from core.offer_token import OfferKeys
from server.settings import Settings

__all__ = ["KEY", "ServerThread", "settings"]

KEY = b"test-offer-key-0123456789abcdef-0123456789"


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
