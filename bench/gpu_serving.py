"""`bash bench/gpu.sh serve`: discountd itself on the GPU against the same discountd on the CPU,
Recommend over gRPC on the 1M-item version, on one machine (issue #6).

bench.gpu times the model alone; this runs discountd as `make bench` does (bench.serving's
server, store and load generator in a separate process) with --device cuda, then --device cpu,
and reports the provider each server says it serves on: the cuda server must say
CUDAExecutionProvider, or the run fails (discountd --device cuda refuses to start without it;
`--device cpu` alone runs anywhere). Rows: the health Check ceiling, then Recommend at
the default batching (64 calls at most) with 32 calls in flight, and with 256 in flight and
batches of up to 256; then both again with 4 workers. Results: a markdown table on stdout, JSON
at --json.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from bench.artifacts import CACHE, cached
from bench.serving import Row, Server, cpu_name, measure, offers_store, serving, table

# (scenario, call, extra server flags, calls in flight, connections, workers). With 4 workers
# the load spreads over 16 connections: each connection reaches one worker.
RUNS: list[tuple[str, str, tuple[str, ...], int, int, int]] = [
    ("health Check (ceiling)", "check", (), 32, 8, 1),
    ("Recommend, batched", "recommend", (), 32, 8, 1),
    ("Recommend, 256 in flight, batches <= 256", "recommend", ("--batch-max-size", "256"), 256,
     8, 1),
    ("health Check, 4 workers (their ceiling)", "check", ("--workers", "4"), 64, 16, 4),
    ("Recommend, batched, 4 workers", "recommend", ("--workers", "4"), 64, 16, 4),
]  # fmt: skip


def served_provider(server: Server) -> str:
    """The provider from discountd's 'serving model V on PROVIDER' log line."""
    for line in server.log:
        found = re.search(r"serving model \S+ on (\w+)", line)
        if found:
            return found.group(1)
    raise SystemExit("bench.gpu_serving: discountd never said which provider it serves on")


@click.command()
@click.option("--items", default=1_000_000, show_default=True, help="Catalog size.")
@click.option("--users", default=10_000, show_default=True, help="Users in the version.")
@click.option("--duration", default=10.0, show_default=True, help="Seconds per measured run.")
@click.option("--warmup", default=200, show_default=True, help="Calls before each run.")
@click.option(
    "--device", "devices", multiple=True, default=("cuda", "cpu"), show_default=True,
    help="discountd --device values to measure, in order.",
)  # fmt: skip
@click.option(
    "--cache", type=click.Path(path_type=Path), default=CACHE, show_default=True,
    help="Where random-factor versions are built once and reused.",
)  # fmt: skip
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write results here.")
def main(
    items: int,
    users: int,
    duration: float,
    warmup: int,
    devices: tuple[str, ...],
    cache: Path,
    json_path: Path | None,
) -> None:
    """Measure discountd's Recommend on each --device, one after the other."""
    started = datetime.now(UTC)
    store = cached(items, users, cache)
    common: dict[str, Any] = {"users": users, "duration": duration, "warmup": warmup}
    rows: list[Row] = []
    providers: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        flags = ("--db-url", offers_store(f"sqlite:///{Path(tmp) / 'store.db'}"))
        for device in devices:
            for scenario, call, extra, in_flight, connections, workers in RUNS:
                if call == "check" and device != devices[0]:
                    continue  # the ceiling is the stack's, whatever the device
                with serving(store, *flags, "--device", device, *extra) as server:
                    providers[device] = served_provider(server)
                    label = f"{scenario}, --device {device} ({providers[device]})"
                    rows.append(
                        measure(server, label, items, call, workers=workers,
                                concurrency=in_flight, connections=connections, **common)
                    )  # fmt: skip
    ceiling = rows[0].load["rps"]
    lines = [
        f"Measured {started:%Y-%m-%d %H:%M} UTC with `bash bench/gpu.sh serve` on "
        f"{cpu_name()}, {os.cpu_count()} cores; {items:,} items, {users:,} users, "
        f"{duration:g} s per run after {warmup} warm-up calls; 8 connections, 16 with 4 workers.",
        "",
        *table(rows),
    ]
    click.echo("\n".join(lines))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        report: dict[str, Any] = {
            "measured_at": started.isoformat(timespec="seconds"),
            "host": {"cpu": cpu_name(), "cores": os.cpu_count()},
            "providers": providers,
            "ceiling_rps": ceiling,
            "rows": [asdict(r) for r in rows],
        }
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if "cuda" in providers and providers["cuda"] != "CUDAExecutionProvider":
        raise click.ClickException(f"discountd --device cuda served on {providers['cuda']}")


if __name__ == "__main__":
    sys.exit(main())
