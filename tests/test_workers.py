"""`discountd --workers 2`: two processes serve one port, each with its own metrics; SIGTERM to
the parent drains both and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from offer_server import eventually
from pg import hanging_proxy, pg_database

from discount.v1 import discount_pb2 as pb
from discount.v1 import discount_pb2_grpc as pb_grpc
from tests.test_metrics import scrape_port, value

pytestmark = pytest.mark.slow  # starts real discountd processes

DISCOUNTD = Path(sys.executable).with_name("discountd")


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    from core.store.db import Store
    from core.store.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'discount.db'}"
    store = Store(url)
    upgrade(store)
    store.dispose()
    return url


def two_workers(tmp_path: Path, model_store: Path, db_url: str) -> subprocess.Popen[str]:
    """`discountd --workers 2` on a copy of the model store, each worker with its own metrics
    port."""
    shutil.copytree(model_store, tmp_path / "models")
    return subprocess.Popen(
        [str(DISCOUNTD), "--model-dir", str(tmp_path / "models"), "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "0", "--device", "cpu", "--db-url", db_url,
         "--insecure-demo-key", "--insecure", "--auth", "off", "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.fixture
def workers(tmp_path: Path, model_store: Path, db_url: str) -> Iterator[subprocess.Popen[str]]:
    process = two_workers(tmp_path, model_store, db_url)
    yield process
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def messages(process: subprocess.Popen[str], until: str, count: int) -> list[str]:
    """Log messages up to the count-th one containing until (fails if stderr closes first)."""
    assert process.stderr is not None
    seen: list[str] = []
    for line in process.stderr:
        seen.append(json.loads(line)["msg"])
        if sum(until in m for m in seen) == count:
            return seen
    pytest.fail(f"discountd closed stderr before {count}x {until!r}: {seen}")


def test_two_workers_share_the_port_and_drain(workers: subprocess.Popen[str]) -> None:
    log = messages(workers, "metrics on", 2)  # each worker logs it after "listening on"
    ports = {m.rsplit(":", 1)[1] for m in log if m.startswith("listening on")}
    assert len(ports) == 1, f"workers listen on different ports: {ports}"
    port = ports.pop()
    metrics_ports = [int(m.rsplit(":", 1)[1].split("/")[0]) for m in log if "metrics on" in m]
    assert len(metrics_ports) == 2 and len(set(metrics_ports)) == 2, log

    calls = 24
    for n in range(calls):
        # A connection of its own per call: the kernel picks a worker per connection.
        with grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            reply = pb_grpc.DiscountServiceStub(channel).Recommend(
                pb.RecommendRequest(user_id=f"user-{n % 40}", limit=3)
            )
            assert len(reply.items) == 3
    served = [
        value(scrape_port(p), "discountd_requests_total", method="Recommend", code="OK", client="-")
        for p in metrics_ports
    ]
    assert sum(served) == calls
    assert all(s > 0 for s in served), f"one worker got every connection: {served}"

    rest: list[str] = []
    reader = threading.Thread(target=lambda: rest.extend(messages(workers, "stopped", 2)))
    reader.start()
    workers.send_signal(signal.SIGTERM)
    assert workers.wait(timeout=60) == 0
    reader.join(timeout=30)
    assert sum(m == "stopped" for m in rest) == 2, rest


def stopped(pid: str) -> bool:
    """Gone, or a zombie not yet reaped: either way it serves nothing."""
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


@pytest.mark.skipif(sys.platform != "linux", reason="workers follow their parent on Linux only")
def test_workers_stop_when_the_parent_is_killed(workers: subprocess.Popen[str]) -> None:
    # A parent killed outright (SIGKILL, the OOM killer) left its workers serving the port
    # unsupervised, next to the workers of the service a supervisor then restarts.
    log = messages(workers, "listening on", 2)
    port = log[-1].rsplit(":", 1)[1]
    children = Path(f"/proc/{workers.pid}/task/{workers.pid}/children").read_text().split()
    assert len(children) == 2, children
    workers.kill()
    workers.wait(timeout=30)
    try:
        for child in children:
            eventually(functools.partial(stopped, child), 30.0)
    finally:  # no orphan outlives a failed run
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child), signal.SIGKILL)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError):
        pb_grpc.DiscountServiceStub(channel).Recommend(
            pb.RecommendRequest(user_id="user-0", limit=3), timeout=5
        )


@pytest.mark.postgres
def test_a_sigterm_while_the_workers_start_is_held_until_they_can_drain(
    tmp_path: Path, model_store: Path
) -> None:
    """A SIGTERM that reaches the workers before their event loops handle signals (here: while
    they wait for a store that does not answer yet) waits for them to, then drains them: exit
    0, not workers killed outright by the signal and a supervisor reporting them failed."""
    from core.store.db import Store
    from core.store.migrate import upgrade

    with pg_database() as url, hanging_proxy(url) as proxy:
        store = Store(url)
        upgrade(store)
        store.dispose()
        proxy.hang()
        process = two_workers(tmp_path, model_store, proxy.url)
        try:
            messages(process, "workers on", 1)
            process.send_signal(signal.SIGTERM)
            # Relayed at once; the workers' store connections wait out the hang meanwhile
            # (they would give up after CONNECT_TIMEOUT_S, 5 s).
            time.sleep(1)
            proxy.resume()
            assert process.wait(timeout=60) == 0
        finally:
            proxy.resume()
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


@pytest.mark.parametrize("told_to_stop", [False, True], ids=["loaded", "stopped-while-loading"])
def test_a_worker_listens_only_once_its_model_is_loaded(
    tmp_path: Path, model_store: Path, told_to_stop: bool
) -> None:
    """The kernel hands each listener on a shared port its share of new connections: a worker
    listening while it loads would answer them UNAVAILABLE beside workers that could serve.
    A worker's server runs here in this process (create_server and start, as serve() runs them
    in a forked worker), its load held on the manifest: a FIFO the test writes when it chooses.
    A worker told to stop while it loads never listens."""
    from server.app import DiscountServer, create_server
    from server.settings import Settings
    from server.workers import unowned_port

    models = tmp_path / "models"
    shutil.copytree(model_store, models)
    manifest = models / (models / "CURRENT").read_text().strip() / "manifest.json"
    content = manifest.read_bytes()
    manifest.unlink()
    os.mkfifo(manifest)
    port = unowned_port("127.0.0.1", 0)  # as the parent picks it for its workers
    settings = Settings(model_dir=models, host="127.0.0.1", port=port, device="cpu", workers=2)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    stopping = asyncio.Event()

    async def start() -> DiscountServer:
        server, _ = create_server(settings)
        await server.start(stopping)
        return server

    started = asyncio.run_coroutine_threadsafe(start(), loop)
    fd = None
    try:
        # Opening for writing succeeds once the worker waits to read it: it is loading.
        fd = eventually(lambda: _writer(manifest), timeout=60) - 1
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        if told_to_stop:
            loop.call_soon_threadsafe(stopping.set)  # as serve() does on SIGTERM
        # The manifest itself for the load's later reads, then the waiting read's content.
        (tmp_path / "manifest.json").write_bytes(content)
        os.replace(tmp_path / "manifest.json", manifest)
        os.write(fd, content)
        os.close(fd)
        fd = None
        server = started.result(timeout=60)
        assert server.store.current is not None and server.listening != told_to_stop
        if told_to_stop:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
        else:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = pb_grpc.DiscountServiceStub(channel).Recommend(
                    pb.RecommendRequest(user_id="user-1", limit=3), timeout=30
                )
            assert len(reply.items) == 3
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=30)
    finally:
        if fd is not None:  # the load still waits: let it read the real manifest and finish
            os.write(fd, content)
            os.close(fd)
        loop.call_soon_threadsafe(loop.stop)


def _writer(fifo: Path) -> int | None:
    """A write end of fifo, plus one (0 is a valid descriptor); None while no one reads it."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader yet
        return None
    os.set_blocking(fd, True)  # the manifest may be larger than the pipe's buffer
    return fd + 1
