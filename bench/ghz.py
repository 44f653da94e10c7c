"""bench.load's options run by ghz (https://ghz.sh) when it is on PATH: the same calls, a config
file ghz reads, and ghz's JSON report read back into bench.load's Report.

ghz finds the request types by server reflection, which discountd serves, so no .proto file
travels with the config. Its data is a list of requests, which ghz sends in turn: the same
random users and items bench.load would send, drawn from the same seed.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from bench.load import Load, Report, requests

METHODS = {
    "check": "grpc.health.v1.Health/Check",
    "recommend": "discount.v1.DiscountService/Recommend",
    "offers": "discount.v1.DiscountService/GetOffers",
}
# Distinct requests in the config: enough that users and items vary as with bench.load, few
# enough that the file stays small (ghz cycles through them).
DATA_ROWS = 2000


def config(load: Load) -> dict[str, Any]:
    """ghz's JSON config for load (ghz's own option names)."""
    made = requests(load)
    data = [MessageToDict(next(made), preserving_proto_field_name=True) for _ in range(DATA_ROWS)]
    out: dict[str, Any] = {
        "host": load.target,
        "call": METHODS[load.call],
        "insecure": not load.tls_ca,
        "concurrency": load.concurrency,
        "connections": load.connections,
        "timeout": "30s",
        "data": data,
        "format": "json",
    }
    if load.total:
        out["total"] = load.total
    else:
        out["duration"] = f"{load.duration:g}s"
        # As bench.load does: the calls in flight at the end are waited for and counted. ghz's
        # default ("close") cancels them and reports each as an error.
        out["duration-stop"] = "wait"
    if load.rate:
        out["rps"] = round(load.rate)
    for key, name in (("cacert", load.tls_ca), ("cert", load.tls_cert), ("key", load.tls_key)):
        if name:
            out[key] = str(Path(name).resolve())  # ghz reads the config from a temp folder
    if load.token:
        out["metadata"] = {"authorization": f"Bearer {load.token}"}
    return out


def run(load: Load, ghz: str) -> Report:
    """Run ghz with load's options; the report as bench.load's own would give it."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ghz.json"
        path.write_text(json.dumps(config(load)))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(
            [ghz, "--config", str(path)], capture_output=True, text=True, check=False
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"ghz failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return report(load, json.loads(done.stdout), cpu, f"ghz {version(ghz)}")


def report(load: Load, ghz: dict[str, Any], cpu_seconds: float, generator: str) -> Report:
    """bench.load's Report from ghz's JSON report (durations in nanoseconds; status codes in
    Go's spelling, e.g. InvalidArgument)."""
    codes = {_upper_snake(code): n for code, n in (ghz.get("statusCodeDistribution") or {}).items()}
    errors = {code: n for code, n in codes.items() if code != "OK"}
    answered = int(ghz["count"]) - sum(errors.values())
    seconds = ghz["total"] / 1e9
    latency = {d["percentage"]: d["latency"] / 1e6 for d in ghz.get("latencyDistribution") or []}
    return Report(
        load.call,
        load.concurrency,
        load.connections,
        load.rate,
        answered,
        errors,
        round(seconds, 3),
        round(answered / seconds, 1) if seconds else 0.0,
        round(latency.get(50, 0.0), 3),
        round(latency.get(95, 0.0), 3),
        round(latency.get(99, 0.0), 3),
        round(cpu_seconds, 3),
        generator,
    )


def version(ghz: str) -> str:
    done = subprocess.run([ghz, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "(version unknown)"


def _upper_snake(code: str) -> str:
    """Go's codes.InvalidArgument.String() is "InvalidArgument"; grpc's Python name is
    INVALID_ARGUMENT, as bench.load reports it. Go spells one code Canceled, Python CANCELLED."""
    if code == "Canceled":
        return "CANCELLED"
    return "OK" if code == "OK" else re.sub(r"(?<!^)(?=[A-Z])", "_", code).upper()
