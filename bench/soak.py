"""Soak: bounded mixed load on a discountd subprocess for minutes; throughput and RSS over time.

Recommend, GetOffers and RecordEvents (a tenth of the event batches are resent: duplicates)
from a fixed number of client tasks at a capped rate, against a server with a SQLite store.
Every interval it samples calls answered per RPC, errors, and the server's resident memory.
Memory growth is judged from the first sample after warm-up to the last (target < 10%).

    SOAK_SECONDS=600 python -m bench.soak          # make soak
"""

from __future__ import annotations

import asyncio
import os
import platform
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from bench.artifacts import cached, item_id, user_id
from bench.doc import write_section
from bench.serving import Server, cpu_name, offers_store
from discount.v1 import discount_pb2 as pb
from discount.v1 import discount_pb2_grpc as pb_grpc

SECTION = "## Soak"
DOC = Path("docs/BENCHMARKS.md")
ITEMS = 10_000
USERS = 10_000
CALLS = ("Recommend", "GetOffers", "RecordEvents")


@dataclass
class Tally:
    answered: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    acked_events: int = 0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def client(stub: Any, seed: int, rate: float, stop_at: float, tally: Tally) -> None:
    rng = random.Random(seed)
    sent_batches: list[pb.RecordEventsRequest] = []
    serial = 0
    next_due = time.monotonic()
    while time.monotonic() < stop_at:
        next_due += 1 / rate
        await asyncio.sleep(max(0.0, next_due - time.monotonic()))
        call = rng.choice(CALLS)
        user = user_id(rng.randrange(USERS))
        try:
            if call == "Recommend":
                await stub.Recommend(pb.RecommendRequest(user_id=user, limit=10), timeout=10)
            elif call == "GetOffers":
                items = [item_id(i) for i in rng.sample(range(ITEMS), 20)]
                await stub.GetOffers(pb.GetOffersRequest(user_id=user, item_ids=items), timeout=10)
            else:
                if sent_batches and rng.random() < 0.1:
                    request = rng.choice(sent_batches)
                else:
                    serial += 1
                    events = [
                        pb.Event(
                            event_id=f"soak-{seed}-{serial}-{k}",
                            type=pb.EVENT_TYPE_CLICK,
                            user_id=user,
                            item_id=item_id(rng.randrange(ITEMS)),
                        )
                        for k in range(10)
                    ]
                    request = pb.RecordEventsRequest(events=events)
                    sent_batches = [*sent_batches[-99:], request]
                reply = await stub.RecordEvents(request, timeout=10)
                tally.acked_events += sum(
                    r.status in (pb.EVENT_STATUS_ACCEPTED, pb.EVENT_STATUS_DUPLICATE)
                    for r in reply.results
                )
            tally.answered[call] += 1
        except grpc.RpcError as e:
            tally.errors[f"{call} {e.code().name}"] += 1


async def soak(server: Server, seconds: float, interval: float, rate: float, clients: int) -> str:
    tally = Tally()
    rows = []
    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        # The aio stub: grpc-stubs types its methods as the sync ones.
        stub: Any = pb_grpc.DiscountServiceStub(channel)
        start = time.monotonic()
        stop_at = start + seconds
        tasks = [
            asyncio.create_task(client(stub, seed, rate / clients, stop_at, tally))
            for seed in range(clients)
        ]
        before, sampled = Counter(tally.answered), start
        while time.monotonic() < stop_at:
            await asyncio.sleep(min(interval, max(0.0, stop_at - time.monotonic())))
            now, at = Counter(tally.answered), time.monotonic()
            elapsed = at - start
            # Over the time since the last sample: the last interval is cut short at stop_at,
            # and a busy event loop wakes late.
            per_call = {c: (now[c] - before[c]) / (at - sampled) for c in CALLS}
            rows.append((elapsed, per_call, rss_mb(server.process.pid), sum(tally.errors.values())))
            before, sampled = now, at
            print(
                f"{elapsed:6.0f}s " + " ".join(f"{c} {v:6.1f}/s" for c, v in per_call.items())
                + f" RSS {rows[-1][2]:.1f} MB errors {rows[-1][3]}",
                flush=True,
            )  # fmt: skip
        await asyncio.gather(*tasks)
    return report(rows, tally, seconds, interval, rate, clients)


def report(
    rows: list[tuple[float, dict[str, float], float, int]],
    tally: Tally,
    seconds: float,
    interval: float,
    rate: float,
    clients: int,
) -> str:
    warm = next((i for i, r in enumerate(rows) if r[0] >= min(60.0, seconds / 5)), 0)
    base, last = rows[warm][2], rows[-1][2]
    growth = (last - base) / base
    totals = [sum(r[1].values()) for r in rows[warm:]]
    lines = [
        f"`SOAK_SECONDS={seconds:.0f} make soak` on {datetime.now(UTC):%Y-%m-%d} "
        f"({cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, load "
        f"average {os.getloadavg()[0]:.1f} at the end: other work shared the machine). "
        f"One discountd process (batching on, SQLite store, {ITEMS:,}-item random-factor "
        f"version), {clients} client tasks at {rate:.0f} calls/s in all, Recommend, GetOffers "
        f"(20 items) and RecordEvents (10 events; a tenth resent) in equal shares. The server's "
        "other settings are its defaults, `--max-connection-age` 300 s among them: a run longer "
        "than that has its client connection closed and replaced under load.",
        "",
        "| time (s) | Recommend/s | GetOffers/s | RecordEvents/s | server RSS (MB) "
        "| errors so far |",
        "|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {t:.0f} | {c['Recommend']:.1f} | {c['GetOffers']:.1f} | {c['RecordEvents']:.1f} "
            f"| {mb:.1f} | {err} |"
            for t, c, mb, err in rows
        ),
        "",
        f"- Calls answered: {sum(tally.answered.values()):,} "
        f"({', '.join(f'{c} {tally.answered[c]:,}' for c in CALLS)}); errors: "
        f"{dict(tally.errors) or 'none'}; events acknowledged: {tally.acked_events:,}.",
        f"- Throughput after warm-up: {min(totals):.1f} to {max(totals):.1f} calls/s per "
        f"{interval:.0f} s interval (offered: {rate:.0f}/s; a client that fell behind its "
        "schedule catches up, so an interval after a slow one can exceed the offered rate).",
        f"- RSS after warm-up ({rows[warm][0]:.0f} s) {base:.1f} MB, at the end {last:.1f} MB: "
        f"growth {growth:+.1%} (target < 10%: {'met' if growth < 0.10 else 'MISSED'}).",
    ]
    return "\n".join(lines)


def main() -> None:
    seconds = float(os.environ.get("SOAK_SECONDS", "600"))
    interval = float(os.environ.get("SOAK_INTERVAL", "30"))
    rate = float(os.environ.get("SOAK_RATE", "100"))
    clients = int(os.environ.get("SOAK_CLIENTS", "8"))
    model = cached(ITEMS, USERS)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(
            model,
            "--db-url",
            offers_store(f"sqlite:///{Path(tmp) / 'store.db'}"),
            "--poll-interval",
            "0",
        )
        try:
            body = asyncio.run(soak(server, seconds, interval, rate, clients))
        finally:
            server.stop()
    print(body)
    write_section(DOC, SECTION, body)


if __name__ == "__main__":
    main()
