"""A gRPC load generator (asyncio, one process) with ghz's main options: concurrency, a total
or a duration, a rate, and connections. It prints one JSON object: throughput, latency
percentiles, errors. With ghz on PATH, ghz runs the same options instead (bench.ghz), unless
--generator builtin.

Calls are spread over ``connections`` channels (ghz's --connections): one HTTP/2 connection
reaches one process, so a server with --workers N needs at least N of them to be loaded whole.

Example:
    python -m bench.load --target 127.0.0.1:50051 --call recommend --concurrency 32 \\
        --duration 10 --users 10000
    python -m bench.load --config bench/loadtest.json
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import click
import grpc
import numpy as np
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.artifacts import item_id, user_id
from discount.v1 import discount_pb2 as pb
from discount.v1 import discount_pb2_grpc as pb_grpc
from trainer.client_auth import channel_credentials, check_token, client_options

CALLS = ("check", "recommend", "offers")
_JSON_KINDS = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}


@dataclass(frozen=True)
class Load:
    target: str = "127.0.0.1:50051"
    call: str = "recommend"
    concurrency: int = 16
    connections: int = 1  # channels the concurrent calls are spread over
    total: int = 0  # calls in all; 0: run for duration
    duration: float = 10.0  # seconds, when total is 0
    rate: float = 0.0  # calls per second across all workers; 0: as fast as answers come
    users: int = 1000  # user ids user-0 .. user-(users-1), as bench.artifacts names them
    items: int = 1000  # catalog size, for GetOffers item ids
    offer_items: int = 20  # items per GetOffers call
    limit: int = 10
    token: str = ""  # bearer token for a server with --auth required
    # PEM files: the CA that signed the server's certificate (no CA: plaintext), and a client
    # certificate and its key for a server with mutual TLS.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    seed: int = 0


@dataclass(frozen=True)
class Report:
    call: str
    concurrency: int
    connections: int
    rate: float
    requests: int
    errors: dict[str, int]
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    cpu_seconds: float  # the generator's CPU during the run: what the load itself costs
    generator: str = "bench.load"  # or "ghz VERSION"


def requests(load: Load) -> Any:
    """Endless requests for load.call: random users (and items), fixed by load.seed."""
    rng = random.Random(load.seed)
    while True:
        user = user_id(rng.randrange(load.users))
        if load.call == "check":
            yield health_pb2.HealthCheckRequest()
        elif load.call == "recommend":
            yield pb.RecommendRequest(user_id=user, limit=load.limit)
        else:
            picks = rng.sample(range(load.items), min(load.offer_items, load.items))
            yield pb.GetOffersRequest(user_id=user, item_ids=[item_id(i) for i in picks])


def credentials(load: Load) -> grpc.ChannelCredentials | None:
    """load's TLS files as channel credentials; None: plaintext. click's usage errors for files
    that do not go together or a CA that is not PEM; OSError for a file that cannot be read."""
    return channel_credentials(
        *(Path(name) if name else None for name in (load.tls_ca, load.tls_cert, load.tls_key))
    )


async def run(load: Load) -> Report:
    metadata = (("authorization", f"Bearer {load.token}"),) if load.token else None
    tls = credentials(load)
    # Each channel its own subchannel pool: channels with equal arguments share one connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        aio.secure_channel(load.target, tls, options=options)
        if tls
        else aio.insecure_channel(load.target, options=options)
        for _ in range(load.connections)
    ]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 30)
        return await _drive(load, [_method(load.call, c) for c in channels], metadata)
    finally:
        for channel in channels:
            await channel.close(None)


def _method(call: str, channel: aio.Channel) -> Any:
    if call == "check":
        return health_pb2_grpc.HealthStub(channel).Check
    if call == "recommend":
        return pb_grpc.DiscountServiceStub(channel).Recommend
    return pb_grpc.DiscountServiceStub(channel).GetOffers


async def _drive(load: Load, methods: list[Any], metadata: Any) -> Report:
    made = requests(load)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    issued = 0
    cpu = time.process_time()
    start = time.perf_counter()
    stop_at = start + load.duration

    def claim() -> float | None:
        """The time this worker's next call is due, or None when the run is over."""
        nonlocal issued
        if (load.total and issued >= load.total) or (
            not load.total and time.perf_counter() >= stop_at
        ):
            return None
        issued += 1
        return start + (issued - 1) / load.rate if load.rate else 0.0

    async def worker(method: Any) -> None:
        while (due := claim()) is not None:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            # At a fixed rate a call's latency runs from when it was due, not from when a worker
            # got free to send it: a call held back behind slow ones waited that long too, and
            # leaving the wait out (coordinated omission) would hide the tail the rate causes.
            sent = due if load.rate else time.perf_counter()
            try:
                await method(next(made), metadata=metadata, timeout=30)
            except grpc.RpcError as e:
                errors[e.code().name] += 1
                continue
            latencies.append(time.perf_counter() - sent)

    await asyncio.gather(*(worker(methods[n % len(methods)]) for n in range(load.concurrency)))
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    p50, p95, p99 = (float(np.percentile(ms, q)) for q in (50, 95, 99))
    return Report(
        load.call,
        load.concurrency,
        load.connections,
        load.rate,
        len(latencies),
        dict(errors),
        round(seconds, 3),
        round(len(latencies) / seconds, 1),
        round(p50, 3),
        round(p95, 3),
        round(p99, 3),
        round(cpu, 3),
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON object with any of the options below (flags override it).",
)
@click.option("--target", help="host:port of discountd.")
@click.option("--call", type=click.Choice(CALLS), help="check: health Check (the ceiling).")
@click.option("--concurrency", type=click.IntRange(1), help="Calls in flight at once.")
@click.option(
    "--connections",
    type=click.IntRange(1),
    help="Channels (HTTP/2 connections) the calls are spread over; at least --workers of the "
    "server, since each connection reaches one worker.",
)
@click.option("--total", type=click.IntRange(0), help="Calls in all (0: use --duration).")
@click.option("--duration", type=click.FloatRange(0, min_open=True), help="Seconds to run.")
@click.option("--rate", type=click.FloatRange(0), help="Calls per second; 0: unthrottled.")
@click.option("--users", type=click.IntRange(1), help="User ids user-0 .. user-N-1.")
@click.option("--items", type=click.IntRange(1), help="Catalog size (item-0 ..) for offers.")
@click.option("--offer-items", type=click.IntRange(1), help="Items per GetOffers call.")
@client_options
@click.option(
    "--generator",
    type=click.Choice(["auto", "ghz", "builtin"]),
    default="auto",
    show_default=True,
    help="auto: ghz when it is on PATH, else this built-in asyncio generator.",
)
def main(config: Path | None, generator: str, **flags: Any) -> None:
    """Load a running discountd and print throughput and latency as JSON."""
    values: dict[str, Any] = {}
    if config is not None:
        try:
            values = json.loads(config.read_text())
        except ValueError as e:
            raise click.UsageError(f"--config {config}: not JSON ({e})") from None
        if not isinstance(values, dict):
            raise click.UsageError(f"--config {config}: not a JSON object of options")
        known = {f.name for f in fields(Load)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise click.UsageError(f"--config {config}: unknown keys {', '.join(unknown)}")
        for f in fields(Load):
            # The token and TLS files are read before any call; other kinds are a TypeError.
            # The value is not echoed: it may be the token.
            value = values.get(f.name)
            if isinstance(f.default, str) and value is not None and not isinstance(value, str):
                raise click.UsageError(
                    f"--config {config}: {f.name} must be a string, got a JSON "
                    f"{_JSON_KINDS.get(type(value), type(value).__name__)}"
                )
    values.update(
        {k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None}
    )
    load = Load(**values)
    check_token(load.token)  # the config's too
    try:
        credentials(load)  # bad TLS files are usage errors before any call
    except OSError as e:
        raise click.UsageError(f"cannot read a TLS file: {e}") from None
    ghz = shutil.which("ghz") if generator != "builtin" else None
    if generator == "ghz" and ghz is None:
        raise click.UsageError("--generator ghz: no ghz on PATH")
    try:
        if ghz is not None:
            from bench import ghz as ghz_run  # it builds on this module's Load and Report

            report = ghz_run.run(load, ghz)
        else:
            report = asyncio.run(run(load))
    except TimeoutError:
        click.echo(f"bench.load: no server answers at {values.get('target')}", err=True)
        sys.exit(1)
    except RuntimeError as e:  # ghz failed; its own words
        click.echo(f"bench.load: {e}", err=True)
        sys.exit(1)
    click.echo(json.dumps(asdict(report)))


if __name__ == "__main__":
    main()
