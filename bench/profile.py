"""`make profile`: where discountd's time goes under load, by thread and by Python function.

For each RPC, a discountd like `make bench`'s (100k-item random-factor version, SQLite store,
one tiered_topk rule) serves bench.load from another process. While it does, two readings
cover the same window: the CPU time of each of the server's threads (/proc), and py-spy
sampling the Python stacks of whichever thread holds the GIL (`--gil --nonblocking`: the
server is not paused, so it runs at its usual rate). Results go to the "Serving profile"
section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from bench.artifacts import CACHE, cached
from bench.doc import write_section
from bench.serving import BIN, DOC, TICKS, Server, cpu_name, load, offers_store, serving, versions

SECTION = "## Serving profile"
SCENARIOS = {
    "check": "health Check (the ceiling)",
    "recommend": "Recommend, batched",
    "offers": "GetOffers, 20 items, tiered_topk",
}
# Frames every sample of a thread passes through on its way to the work: cut off, so that the
# shares below say what the work is.
ROOTS = ("BaseEventLoop._run_once", "_WorkItem.run", "Thread.run")


def py_spy() -> str:
    """py-spy beside this Python (a venv's, whether or not it is on PATH), or on PATH."""
    found = shutil.which("py-spy", path=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))
    if found is None:
        raise click.ClickException("py-spy is not installed (pip install py-spy; it is in [dev])")
    return found


@dataclass
class Profile:
    call: str
    rps: float
    threads: dict[str, float]  # label: ms of CPU per call
    samples: int
    inclusive: list[tuple[str, float]]  # function: share of GIL samples
    own: list[tuple[str, float]]


def thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """Each thread of pid: its name (comm) and CPU time so far, in clock ticks."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            comm = (task / "comm").read_text().strip()
            out[int(task.name)] = (comm, int(fields[11]) + int(fields[12]))
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return out


def label(tid: int, pid: int, comm: str, python_names: dict[int, str]) -> str:
    """What a thread is: Python threads by their name, native ones by what starts them."""
    name = python_names.get(tid, "")
    if tid == pid:
        return "event loop (main thread)"
    if name.startswith("asyncio_"):
        return "asyncio.to_thread workers (model runs, offer-log writes)"
    if "_poll_wrapper" in name:
        return "gRPC poller (Python thread)"
    if name:
        return f"other Python thread ({name})"
    if comm in ("event_engine", "grpc_global_tim", "lifeguard"):
        return "gRPC core threads"
    return "other native threads"


def parse_raw(text: str) -> tuple[dict[int, str], list[tuple[list[str], int]]]:
    """py-spy's raw format: 'thread (tid): name;frame;frame... count' per line."""
    names: dict[int, str] = {}
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        found = re.match(r"thread \((\d+)\): (.*)", frames[0])
        if not found or not count.isdigit():
            continue
        names[int(found.group(1))] = found.group(2)
        # "f (path/file.py:123)" -> "f (path/file.py)": lines of one function add up.
        work = [re.sub(r":\d+\)$", ")", f) for f in frames[1:]]
        for root in ROOTS:
            cut = [i for i, f in enumerate(work) if f.startswith(root + " ")]
            if cut:
                work = work[cut[-1] + 1 :]
                break
        stacks.append((work, int(count)))
    return names, stacks


def shares(
    stacks: list[tuple[list[str], int]], top: int
) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """Total samples; the functions most often on the stack, and most often on top of it."""
    total = sum(n for _, n in stacks) or 1
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1] if frames else "(between callbacks)"] += n
    return (
        total,
        [(f, n / total) for f, n in inclusive.most_common(top)],
        [(f, n / total) for f, n in own.most_common(top)],
    )


def profile_one(spy: str, server: Server, call: str, seconds: int, rate: int, top: int,
                options: dict[str, Any]) -> Profile:  # fmt: skip
    load(server, call, **{**options, "total": 300, "rate": 0})  # warm the code paths
    result: dict[str, Any] = {}

    def drive() -> None:  # a second longer than the sampling on each side of it
        try:
            result.update(load(server, call, duration=seconds + 2, **options))
        except SystemExit as e:  # the load generator failed: say so from the main thread
            result["failure"] = str(e)

    driver = threading.Thread(target=drive)
    driver.start()
    time.sleep(1)
    pid = server.process.pid
    before = thread_ticks(pid)
    with tempfile.NamedTemporaryFile(suffix=".txt") as raw:
        sampled = subprocess.run(
            [spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate",
             str(rate), "--format", "raw", "--gil", "--nonblocking", "--threads", "--output",
             raw.name],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        after = thread_ticks(pid)
        # Thread names: py-spy's samples name only the threads that held the GIL.
        dump = subprocess.run([spy, "dump", "--pid", str(pid), "--nonblocking"],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if sampled.returncode != 0:
            raise SystemExit(f"bench.profile: py-spy failed: {sampled.stderr.strip()[-500:]}")
        names, stacks = parse_raw(Path(raw.name).read_text())
    for tid, name in re.findall(r'^Thread (\d+) \([^)]*\): "(.*)"$', dump.stdout, re.M):
        names[int(tid)] = name
    driver.join()
    if "failure" in result:
        raise SystemExit(result["failure"])
    calls = result["rps"] * seconds  # in the sampled window, at the run's mean rate
    threads: collections.Counter[str] = collections.Counter()
    for tid, (comm, ticks) in after.items():
        used = ticks - before.get(tid, (comm, 0))[1]
        threads[label(tid, pid, comm, names)] += used / TICKS / max(calls, 1) * 1000
    samples, inclusive, own = shares(stacks, top)
    print(f"{call}: {result['rps']:.0f} calls/s, {samples} GIL samples", flush=True)
    return Profile(call, result["rps"], dict(threads.most_common()), samples, inclusive, own)


def render(profile: Profile) -> list[str]:
    total = sum(profile.threads.values())
    lines = [
        # The load run's mean, a second either side of the sampling included (the generator
        # reports one rate per run): py-spy slows the server, so the sampled window ran slower.
        f"### {SCENARIOS[profile.call]} ({profile.rps:,.0f} calls/s, the load run's mean)",
        "",
        "| thread | ms of CPU per call |",
        "|---|---:|",
        *[f"| {name} | {ms:.3f} |" for name, ms in profile.threads.items() if ms >= 0.0005],
        f"| **server, all threads** | **{total:.3f}** |",
        "",
        f"Python, by share of the {profile.samples:,} samples that found a thread holding the "
        "GIL (inclusive: the function or what it called; own: the function itself):",
        "",
        "| function (inclusive) | share | function (own) | share |",
        "|---|---:|---|---:|",
    ]
    for (f, a), (g, b) in zip(profile.inclusive, profile.own, strict=False):
        lines.append(f"| `{f}` | {a:.1%} | `{g}` | {b:.1%} |")
    return [*lines, ""]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--calls", default="check,recommend,offers", show_default=True,
              help="RPCs to profile, comma-separated: check, recommend, offers.")  # fmt: skip
@click.option("--items", default=100_000, show_default=True, help="Catalog size of the version.")
@click.option("--users", default=10_000, show_default=True, help="Users in the version.")
@click.option("--seconds", default=10, show_default=True, type=click.IntRange(1),
              help="Seconds sampled per RPC.")  # fmt: skip
@click.option("--rate", default=100, show_default=True, help="py-spy samples per second.")
@click.option("--concurrency", default=32, show_default=True, help="Calls in flight.")
@click.option("--connections", default=8, show_default=True, help="HTTP/2 connections.")
@click.option("--top", default=15, show_default=True, help="Functions listed per RPC.")
@click.option("--cache", type=click.Path(path_type=Path), default=CACHE, show_default=True,
              help="Where the random-factor versions are kept between runs.")  # fmt: skip
@click.option("--doc", type=click.Path(path_type=Path), default=DOC, show_default=True,
              help="Markdown file whose Serving profile section is rewritten.")  # fmt: skip
def main(calls: str, items: int, users: int, seconds: int, rate: int, concurrency: int,
         connections: int, top: int, cache: Path, doc: Path) -> None:  # fmt: skip
    """Profile discountd under load with py-spy and write docs/BENCHMARKS.md's Serving profile."""
    chosen = [c.strip() for c in calls.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown or not chosen:
        raise click.BadParameter(f"choose from {', '.join(SCENARIOS)}", param_hint="--calls")
    spy = py_spy()
    started = datetime.now(UTC)
    store = cached(items, users, cache)
    options = {"concurrency": concurrency, "connections": connections, "users": users,
               "items": items}  # fmt: skip
    profiles = []
    with tempfile.TemporaryDirectory() as tmp:
        url = offers_store(f"sqlite:///{Path(tmp) / 'store.db'}")
        for call in chosen:
            with serving(store, "--db-url", url, "--offer-ttl", "60") as server:
                profiles.append(profile_one(spy, server, call, seconds, rate, top, options))
    spy_version = subprocess.run([spy, "--version"], capture_output=True, text=True, check=False)
    lines = [
        f"Measured {started:%Y-%m-%d %H:%M} UTC with `make profile` (`python -m bench.profile`) "
        f"on {cpu_name()}, {os.cpu_count()} cores visible; {versions()}, "
        f"{spy_version.stdout.strip()}.",
        "",
        f"Server and load as in the section above: one discountd on the {items:,}-item "
        f"random-factor version with the bench's SQLite store, `bench.load` in another process "
        f"({concurrency} calls in flight over {connections} connections). For {seconds:g} s of "
        f"each run, the CPU time of each server thread (/proc) and py-spy at {rate} Hz "
        "(`--gil --nonblocking`: the thread holding the GIL, without pausing the server). CPU "
        "per call divides by the run's mean rate; py-spy's own sampling costs the server a "
        "little throughput. Frames below the event loop's `_run_once` (and a worker thread's "
        "`run`) are cut off, so the shares name the work. `Handle._run`'s own share is C code "
        "its callbacks run without a Python frame of their own: gRPC's Cython layer, which "
        "reads, parses and answers calls, and protobuf.",
        "",
    ]
    for profile in profiles:
        lines += render(profile)
    write_section(doc, SECTION, "\n".join(lines), before="## Soak")
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
