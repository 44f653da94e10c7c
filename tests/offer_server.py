"""A real discountd with a store (create_server + start on 127.0.0.1:0) for offer tests, and
discountctl run in-process the way an admin types it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
from click.testing import CliRunner, Result
from secure_server import settings
from server_thread import ServerThread

from admin.cli import cli
from core.store import migrate
from core.store.db import Store
from discount.v1 import discount_pb2_grpc

T = TypeVar("T")


def ctl(url: str, *args: str) -> Result:
    result = CliRunner().invoke(cli, ["--db-url", url, "--actor", "tester", *args])
    assert result.exit_code == 0, result.output
    return result


class OfferServer(ServerThread):
    def __init__(
        self,
        model_dir: Path,
        db_url: str,
        rules_poll_interval: float = 0.2,
        offer_ttl: float = 60,
        response_model_dir: Path | None = None,
    ) -> None:
        super().__init__(
            settings(
                model_dir,
                db_url,
                rules_poll_interval=rules_poll_interval,
                offer_ttl=offer_ttl,
                response_model_dir=response_model_dir,
            )
        )
        self.channel = grpc.insecure_channel(self.target)
        self.stub = discount_pb2_grpc.DiscountServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        super().close()


def ten_percent_off_everything(url: str) -> str:
    """Migrate the store at url and give it one rule: 10% off every item, for every user."""
    store = Store(url)
    migrate.upgrade(store)
    store.dispose()
    ctl(url, "rules", "create", "all", "--policy", "threshold",
        "--param", "t=-100", "--param", "d=10")  # fmt: skip
    return url


def eventually(check: Callable[[], T | None], timeout: float, step: float = 0.05) -> T:
    """The first truthy result of check() within timeout seconds, else AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s; last: {value!r}")
        time.sleep(step)
