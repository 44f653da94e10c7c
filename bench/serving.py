"""`make bench`: discountd under load from a separate process, and ONNX Runtime vs PyTorch.

Each scenario starts a real discountd subprocess on a random-factor model version
(bench.artifacts), runs bench.load against it in another process, and reads the server's CPU
time and peak RSS from /proc. The health Check on the 100k server is the ceiling: the same
stack doing no work. Results go to the "Serving performance" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import numpy as np

from bench.artifacts import CACHE, cached, eager_graph, random_feeds
from bench.doc import write_section
from server.versions import LARGE_CATALOG

F = TypeVar("F", bound=Callable[..., Any])

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Serving performance"
NOTES = "### Notes on the serving figures"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    scenario: str
    items: int
    load: dict[str, Any]
    cpu_s_per_1k: float
    peak_rss_mb: float
    workers: int = 1


class Server:
    """A discountd subprocess; port from its 'listening on' log line, once every worker has
    said it (a worker listens only once its model is loaded: a run begun before would miss the
    late ones, its connections all on the others)."""

    def __init__(self, model_dir: Path, *flags: str) -> None:
        self.process = subprocess.Popen(
            [str(BIN / "discountd"), "--model-dir", str(model_dir), "--host", "127.0.0.1",
             "--port", "0", "--device", "cpu", "--insecure", "--auth", "off",
             "--insecure-demo-key", "--log-level", "info", *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.log: list[str] = []
        workers = int(flags[flags.index("--workers") + 1]) if "--workers" in flags else 1
        listening = 0
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            listening += found is not None
            if found and listening == workers:
                self.port = int(found.group(1))
                break
        else:
            raise SystemExit("bench: discountd did not start:\n" + "".join(self.log[-20:]))
        # Keep reading so a full pipe never blocks the server.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)

    def pids(self) -> list[int]:
        """The server and, with --workers, its worker processes."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [pid, *map(int, children)]

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / TICKS

    def peak_rss_mb(self) -> float:
        """Summed over the processes (workers share little: each loads its own model)."""
        total = 0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        return total / 1024

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


@contextmanager
def serving(model_dir: Path, *flags: str) -> Iterator[Server]:
    server = Server(model_dir, *flags)
    try:
        yield server
    finally:
        server.stop()


def load(server: Server, call: str, **options: Any) -> dict[str, Any]:
    args = [sys.executable, "-m", "bench.load", "--target", f"127.0.0.1:{server.port}",
            "--call", call]  # fmt: skip
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(args, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"bench: load generator failed: {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def measure(
    server: Server,
    scenario: str,
    size: int,
    call: str,
    warmup: int,
    workers: int = 1,
    **options: Any,
) -> Row:
    if warmup:
        load(server, call, **{**options, "total": warmup, "rate": 0})  # warm the code paths
    cpu = server.cpu_seconds()
    result = load(server, call, **options)
    used = server.cpu_seconds() - cpu
    per_1k = used / max(result["requests"], 1) * 1000
    row = Row(scenario, size, result, round(per_1k, 3), round(server.peak_rss_mb(), 1), workers)
    print(f"{scenario:40s} {result['rps']:8.1f}/s p50 {result['p50_ms']:.2f} "
          f"p99 {result['p99_ms']:.2f} ms errors {result['errors']}", flush=True)  # fmt: skip
    return row


def offers_store(url: str) -> str:
    """Migrate the store at url and give it the bench's one rule."""
    ctl = [str(BIN / "discountctl"), "--db-url", url, "--actor", "bench"]
    for args in (
        ["db", "upgrade"],
        ["rules", "create", "bench-tiered", "--policy", "tiered_topk", "--param", "k1=3",
         "--param", "d1=15", "--param", "d2=5", "--max-discount", "20"],
    ):  # fmt: skip
        subprocess.run([*ctl, *args], check=True, capture_output=True)
    return url


@contextmanager
def postgres_store(server_url: str) -> Iterator[str]:
    """A new database on the PostgreSQL server of server_url, migrated; dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = make_url(server_url)
    name = f"discount_bench_{secrets.token_hex(4)}"
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield offers_store(base.set(database=name).render_as_string(hide_password=False))
    finally:  # also when the work in it failed: no database is left behind
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def store_options(command: F) -> F:
    """--pg-url and --doc, for a bench that measures the store on SQLite and PostgreSQL."""
    command = click.option(
        "--doc", type=Path, default=Path("docs/BENCHMARKS.md"), show_default=True
    )(command)
    return click.option(
        "--pg-url",
        envvar="DISCOUNT_BENCH_PG_URL",
        default="",
        help="Also a PostgreSQL store: a database is created on this server and dropped.",
    )(command)


def bench_stores(stack: ExitStack, pg_url: str) -> dict[str, str]:
    """Store URLs by name, each alive until stack closes: SQLite in a temporary folder, and with
    pg_url a PostgreSQL database made for the run (checked first, so that a server that does not
    answer stops the bench before the SQLite runs)."""
    folder = stack.enter_context(tempfile.TemporaryDirectory())
    stores = {"SQLite": f"sqlite:///{folder}/store.db"}
    if pg_url:
        require_postgres(pg_url)
        stores["PostgreSQL"] = stack.enter_context(postgres_store(pg_url))
    return stores


def require_postgres(server_url: str) -> None:
    """Fail in one line before any run, not after the SQLite ones, when PostgreSQL does not
    answer at server_url."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from core.store.db import Store
    from core.store.errors import StoreError

    try:
        store = Store(make_url(server_url).set(database="postgres").render_as_string(False))
        try:
            store.ping()
        finally:
            store.dispose()
    except (StoreError, SQLAlchemyError) as e:
        raise SystemExit(f"bench: --pg-url: {e}") from None


def scenarios(
    stores: dict[int, Path],
    middle: int,
    flags: tuple[str, ...],
    common: dict[str, Any],
    pg_url: str,
) -> list[Row]:
    """The ceiling first, then Recommend per catalog size, unbatched, and GetOffers (again on
    a PostgreSQL store when pg_url names a server); then the ceiling, Recommend and GetOffers
    again with 2 workers."""
    with serving(stores[middle], *flags) as server:
        rows = [measure(server, "health Check (ceiling)", middle, "check", **common)]
    cores = os.cpu_count() or 1
    for n, store in stores.items():
        with serving(store, *flags) as server:
            row = measure(server, "Recommend, batched", n, "recommend", **common)
            rows.append(row)
            if n == middle:
                rate = round(row.load["rps"] * 0.8, 1)
                rows.append(
                    measure(server, "Recommend, batched, 80% rate", n, "recommend", rate=rate,
                            **common)
                )  # fmt: skip
        if n == max(stores) and cores > 1:
            # The other side of the default's choice (server.versions.ort_threads_for): all the
            # cores below LARGE_CATALOG items, one kept for the event loop from there on.
            other = cores - 1 if n >= LARGE_CATALOG else cores
            with serving(store, *flags, "--ort-threads", str(other)) as server:
                rows.append(
                    measure(server, f"Recommend, batched, --ort-threads {other}", n, "recommend",
                            **common)
                )  # fmt: skip
    with serving(stores[middle], *flags, "--batch-max-size", "1") as server:
        rows.append(measure(server, "Recommend, unbatched", middle, "recommend", **common))
    with serving(stores[middle], *flags) as server:
        rows.append(
            measure(server, "GetOffers, 20 items, tiered_topk", middle, "offers", items=middle,
                    **common)
        )  # fmt: skip
    if pg_url:
        # The production store: the offer log writes its batches there instead of to SQLite.
        with (
            postgres_store(pg_url) as url,
            serving(stores[middle], "--db-url", url, "--offer-ttl", "60") as server,
        ):
            rows.append(
                measure(server, "GetOffers, 20 items, PostgreSQL store", middle, "offers",
                        items=middle, **common)
            )  # fmt: skip
    # Each of the load generator's connections reaches one worker: it spreads its calls over
    # several (--connections), or a second worker would sit idle.
    with serving(stores[middle], *flags, "--workers", "2") as server:
        for scenario, call in (
            ("health Check, 2 workers (their ceiling)", "check"),
            ("Recommend, batched, 2 workers", "recommend"),
            ("GetOffers, 20 items, 2 workers", "offers"),
        ):
            rows.append(measure(server, scenario, middle, call, workers=2, items=middle, **common))
    return rows


def compare_runtimes(store: Path, n_items: int, n_users: int, repeats: int) -> list[dict[str, Any]]:
    """The cached version's model.onnx in ONNX Runtime vs the same graph in PyTorch eager."""
    import onnxruntime as ort
    import torch

    from core.artifact import current_version_dir

    torch.set_num_threads(2)
    module, n_categories = eager_graph(n_items, n_users)
    # Two threads, as PyTorch's above: ORT's default is one per physical core, which matches
    # the table's "2 threads each" only on a 2-core machine.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(
        str(current_version_dir(store) / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    rows = []
    for batch in (1, 32, 256):
        feeds = random_feeds(n_users, n_items, n_categories, batch)
        tensors = [torch.from_numpy(a) for a in feeds.values()]
        ort_items, _ = session.run(None, feeds)
        with torch.no_grad():
            torch_items, _ = module(*tensors)
        agree = bool(np.array_equal(ort_items, torch_items.numpy()))
        calls: dict[str, Callable[[], object]] = {
            "onnxruntime": functools.partial(session.run, None, feeds),
            "pytorch": functools.partial(module, *tensors),
        }
        timings = {}
        for name, call in calls.items():
            with torch.no_grad():
                call()
                start = time.perf_counter()
                done = 0
                # At most `repeats` calls, and no more than ~3 s each (1M-item batches are slow).
                while done < repeats and (done < 3 or time.perf_counter() - start < 3):
                    call()
                    done += 1
                timings[name] = (time.perf_counter() - start) / done * 1000
        rows.append({"batch": batch, **{k: round(v, 3) for k, v in timings.items()},
                     "same_top10": agree})  # fmt: skip
        print(f"batch {batch}: ORT {timings['onnxruntime']:.2f} ms, "
              f"PyTorch {timings['pytorch']:.2f} ms, same top-10: {agree}", flush=True)  # fmt: skip
    return rows


def _generator(rows: list[Row]) -> str:
    """Who made the load: bench.load's own asyncio client, or ghz when it was on PATH."""
    names = sorted({row.load.get("generator", "bench.load") for row in rows})
    if names == ["bench.load"]:
        return "`bench.load` (asyncio gRPC client, one process on the same machine)"
    return f"{', '.join(names)} (run by `bench.load`, on the same machine)"


def versions() -> str:
    import grpc
    import onnxruntime
    import torch

    return (
        f"Python {platform.python_version()}, grpcio {grpc.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, torch {torch.__version__}"
    )


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def table(rows: list[Row]) -> list[str]:
    """One line per row; `vs ceiling` against the Check of a server with as many workers."""
    ceilings = {r.workers: r.load["rps"] for r in rows if r.load["call"] == "check"}
    out = [
        "| scenario | items | concurrency | rate | calls | calls/s | vs ceiling | p50 ms | "
        "p95 ms | p99 ms | errors | server CPU s / 1k calls | load gen CPU s / 1k calls | "
        "peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        x = r.load
        errors = sum(x["errors"].values())
        rate = f"{x['rate']:.0f}" if x["rate"] else "max"
        out.append(
            f"| {r.scenario} | {r.items:,} | {x['concurrency']} | {rate} | {x['requests']:,} | "
            f"{x['rps']:,.0f} | {x['rps'] / ceilings[r.workers]:.0%} | {x['p50_ms']:.2f} | "
            f"{x['p95_ms']:.2f} | {x['p99_ms']:.2f} | {errors} | {r.cpu_s_per_1k:.3f} | "
            f"{x['cpu_seconds'] / max(x['requests'], 1) * 1000:.3f} | {r.peak_rss_mb:,.0f} |"
        )
    return out


def targets(rows: list[Row], ceiling: float, middle: int) -> list[str]:
    """The issue's targets, judged on this run's rows for the middle catalog."""
    by_name = {r.scenario: r for r in rows if r.items == middle}
    recommend = by_name["Recommend, batched"].load["rps"] / ceiling
    p99 = by_name["Recommend, batched, 80% rate"].load["p99_ms"]
    offers = by_name["GetOffers, 20 items, tiered_topk"].load["rps"] / ceiling

    def verdict(ok: bool) -> str:
        return "met" if ok else "**MISSED**"

    return [
        f"- Target Recommend ({middle:,} items) >= 70% of the ceiling: {verdict(recommend >= 0.7)}"
        f" ({recommend:.0%}).",
        f"- Target p99 <= 20 ms at 80% of that throughput: {verdict(p99 <= 20)} ({p99:.1f} ms).",
        f"- Target GetOffers >= 50% of the ceiling: {verdict(offers >= 0.5)} ({offers:.0%}).",
    ]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--sizes", default="10000,100000,1000000", show_default=True,
              help="Catalog sizes (items) for Recommend; the ceiling and GetOffers use the "
              "middle one.")  # fmt: skip
@click.option("--users", default=10_000, show_default=True, help="Users in each version.")
@click.option("--duration", default=10.0, show_default=True, help="Seconds per measured run.")
@click.option("--concurrency", default=32, show_default=True, help="Calls in flight.")
@click.option("--connections", default=8, show_default=True,
              help="HTTP/2 connections the calls share; each reaches one worker, picked by "
              "the kernel.")  # fmt: skip
@click.option("--warmup", default=200, show_default=True, help="Calls before each run.")
@click.option("--repeats", default=50, show_default=True, help="Runs per ONNX/PyTorch timing.")
@click.option("--cache", type=click.Path(path_type=Path), default=CACHE, show_default=True,
              help="Where the random-factor versions are kept between runs.")  # fmt: skip
@click.option("--doc", type=click.Path(path_type=Path), default=DOC, show_default=True,
              help="Markdown file whose Serving performance section is rewritten.")  # fmt: skip
@click.option("--pg-url", envvar="DISCOUNT_BENCH_PG_URL", default="",
              help="A PostgreSQL server (SQLAlchemy URL) for one more GetOffers run with the "
              "store there: a database is created next to the URL's and dropped afterwards. "
              "Unset: SQLite only.")  # fmt: skip
def main(
    sizes: str,
    users: int,
    duration: float,
    concurrency: int,
    connections: int,
    warmup: int,
    repeats: int,
    cache: Path,
    doc: Path,
    pg_url: str,
) -> None:
    """Measure discountd's throughput and latency and write them to docs/BENCHMARKS.md."""
    if pg_url:
        require_postgres(pg_url)
    counts = [int(s) for s in sizes.split(",")]
    middle = counts[len(counts) // 2]
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    stores = {}
    for n in counts:
        built = time.perf_counter()
        stores[n] = cached(n, users, cache)
        print(f"version with {n:,} items ready in {time.perf_counter() - built:.0f}s", flush=True)
    common = {
        "concurrency": concurrency,
        "connections": connections,
        "users": users,
        "duration": duration,
        "warmup": warmup,
    }
    with tempfile.TemporaryDirectory() as tmp:
        # Every server gets the same store (discountd always has one): SQLite with one rule.
        flags = (
            "--db-url",
            offers_store(f"sqlite:///{Path(tmp) / 'store.db'}"),
            "--offer-ttl",
            "60",
        )
        rows = scenarios(stores, middle, flags, common, pg_url)
    ceiling = rows[0].load["rps"]
    runtimes = compare_runtimes(stores[middle], middle, users, repeats)
    load_after = os.getloadavg()
    lines = [
        f"Measured {started:%Y-%m-%d %H:%M} UTC with `make bench` (`python -m bench.serving`) on "
        f"{cpu_name()}, {os.cpu_count()} cores visible; {versions()}. Load average (1 min) "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after: other jobs shared the "
        "machine, so absolute figures are noisy.",
        "",
        "Server: discountd (one process unless the row says 2 workers), ONNX Runtime CPU, "
        "plaintext, auth off, info logging, its store SQLite unless the row says PostgreSQL "
        "(a local server, on the same cores). "
        f"Load: {_generator(rows)}, "
        f"{concurrency} calls in flight over {connections} connections, {duration:.0f} s per "
        f"run after {warmup} warm-up calls; "
        f"Recommend for random users of {users:,} with limit 10; in the rate row a call's "
        "latency runs from the time it was due, not from when it could be sent. Models: random "
        "factors "
        f"(bench/artifacts.py), 64 factors, 20 categories. Server CPU is its user+system "
        f"time; peak RSS is its VmHWM (both summed over the processes with 2 workers); load "
        f"gen CPU is the load generator's own, on the same cores. `vs ceiling` divides by the "
        f"health Check throughput of a server with as "
        f"many workers ({ceiling:,.0f}/s with one); the targets are judged on one worker.",
        "",
        *table(rows),
        "",
        *targets(rows, ceiling, middle),
        "",
        f"ONNX Runtime vs PyTorch eager, the same {middle:,}-item graph (2 threads each), "
        f"mean ms per call over up to {repeats} calls (at least 3, about 3 s at most):",
        "",
        "| batch | ONNX Runtime ms | PyTorch ms | ORT users/s | same top-10 |",
        "|---:|---:|---:|---:|---|",
        *(
            f"| {r['batch']} | {r['onnxruntime']:.2f} | {r['pytorch']:.2f} | "
            f"{r['batch'] / r['onnxruntime'] * 1000:,.0f} | {'yes' if r['same_top10'] else 'no'} |"
            for r in runtimes
        ),
        "",
    ]
    (cache / "last.json").write_text(
        json.dumps({"rows": [r.__dict__ for r in rows], "runtimes": runtimes}, indent=1)
    )
    # Hand-written analysis below the generated part stays.
    write_section(doc, SECTION, "\n".join(lines), keep=NOTES)
    print(f"wrote the Serving performance section of {doc}")


if __name__ == "__main__":
    main()
