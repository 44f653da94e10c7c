"""`make bench-gpu` (bench/gpu.sh): Recommend's graph on ONNX Runtime's CUDA provider against its
CPU provider, in users per second (issue #6).

Both sessions are opened by server.model.load_version, so they carry discountd's options and its
check of the provider that really became active (ORT falls back to the CPU silently). Each mode
times model.onnx on the same random users (known users, 8 excluded items each, every category,
top 10) at each batch size:

- cpu: CPUExecutionProvider, session.run() with numpy in and out (what discountd does on a CPU).
- cuda: CUDAExecutionProvider, session.run() (what discountd does on a GPU).
- cuda-iobinding-gpu-out: IO binding; every call copies its inputs into buffers bound on the GPU,
  and the outputs stay there (the most IO binding can save; a server would still copy the top-k
  back to the host).
- cuda-iobinding-cpu-out: the same inputs, outputs written into bound host buffers (what a server
  using IO binding would do).
- torch-cuda: the same graph in PyTorch eager on the GPU (bench.artifacts.eager_graph), inputs
  copied to it and the top-k back each call: what serving from PyTorch instead would give.

Without a CUDA provider that starts, the cuda rows are left out with the reason and the cpu rows
are still measured. --cpu-checks also runs the IO-binding and PyTorch code on the CPU, so a
machine without a GPU exercises them too. Results: a markdown table on stdout, JSON at --json
(rewritten after each row, so a run cut short still leaves what it measured).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import numpy as np

from bench.artifacts import (
    CACHE,
    EXCLUDED,
    TOP_K,
    Feeds,
    cached,
    eager_graph,
    random_feeds,
)
from core.artifact import ArtifactError, current_version_dir
from server.errors import DeviceUnavailable
from server.model import CPU, CUDA, OUTPUT_NAMES, ModelVersion, load_version


@dataclass
class Row:
    mode: str
    provider: str
    batch: int
    runs: int = 0
    mean_ms: float | None = None
    min_ms: float | None = None
    users_per_s: float | None = None
    vs_cpu: float | None = None  # users/s over the cpu row's at the same batch
    top10_same_as_cpu: float | None = None  # share of (user, rank) positions with the same item
    max_score_diff: float | None = None  # against the cpu row; TF32 GEMMs on CUDA round more
    error: str | None = None


@dataclass
class Report:
    measured_at: str
    host: dict[str, Any]
    versions: dict[str, Any]
    model: dict[str, Any]
    settings: dict[str, Any]
    cuda: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)


def time_calls(
    call: Callable[[], object], *, warmup: int, seconds: float, min_runs: int, max_runs: int
) -> list[float]:
    """Seconds per call after `warmup` untimed calls: at least min_runs, then until `seconds`
    have passed, at most max_runs (a fast GPU call would otherwise run a million times)."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (
        len(times) < min_runs or time.perf_counter() - start < seconds
    ):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return times


def run_call(model: ModelVersion, feeds: Feeds) -> tuple[Callable[[], object], Callable[[], Any]]:
    """session.run with numpy in and out; (the timed call, the call whose outputs are checked)."""

    def call() -> list[Any]:
        return model.session.run(OUTPUT_NAMES, feeds)  # type: ignore[no-any-return]

    return call, call


def iobinding_call(
    model: ModelVersion, feeds: Feeds, device: str, outputs_on_device: bool
) -> tuple[Callable[[], object], Callable[[], Any]]:
    """session.run_with_iobinding over input buffers on `device` that each call refills from
    host arrays (every Recommend batch has new users), and outputs on the device or in host
    buffers."""
    import onnxruntime as ort

    binding = model.session.io_binding()
    buffers = {}
    for name, array in feeds.items():
        if name == "k":
            # TopK reads k on the host even on CUDA; a device copy would cost a copy back.
            binding.bind_cpu_input(name, array)
            continue
        buffers[name] = ort.OrtValue.ortvalue_from_numpy(array, device, 0)
        binding.bind_ortvalue_input(name, buffers[name])
    batch, k = len(feeds["user_index"]), min(TOP_K, model.manifest.n_items)
    out_device = device if outputs_on_device else "cpu"
    for name, dtype in zip(OUTPUT_NAMES, (np.int64, np.float32), strict=True):
        out = ort.OrtValue.ortvalue_from_shape_and_type([batch, k], dtype, out_device, 0)
        binding.bind_ortvalue_output(name, out)

    def call() -> None:
        for name, value in buffers.items():
            value.update_inplace(feeds[name])
        model.session.run_with_iobinding(binding)
        # Run synchronizes the provider's stream already; this keeps the timing honest should a
        # run option ever turn that off.
        binding.synchronize_outputs()

    def outputs() -> list[Any]:
        call()
        return binding.copy_outputs_to_cpu()  # type: ignore[no-any-return]

    return call, outputs


def torch_call(
    module: Any, feeds: Feeds, device: str
) -> tuple[Callable[[], object], Callable[[], Any]]:
    """PyTorch eager on `device`: each call copies the inputs there and the top-k back."""
    import torch

    def call() -> list[Any]:
        with torch.no_grad():
            tensors = [torch.from_numpy(array).to(device) for array in feeds.values()]
            items, scores = module(*tensors)
            return [items.cpu().numpy(), scores.cpu().numpy()]  # .cpu() waits for the GPU

    return call, call


def measure(
    row: Row,
    calls: tuple[Callable[[], object], Callable[[], Any]],
    reference: list[Any] | None,
    timing: dict[str, Any],
) -> list[Any] | None:
    """Fill row from timing calls[0]; compare calls[1]'s outputs with the reference. A failing
    mode records its error and the run goes on: a device run is too scarce to lose to one mode."""
    call, outputs = calls
    try:
        result = outputs()
        times = time_calls(call, **timing)
    except Exception as e:  # ORT raises its own untyped errors
        row.error = f"{type(e).__name__}: {e}"
        return None
    row.runs = len(times)
    row.mean_ms = round(float(np.mean(times)) * 1000, 3)
    row.min_ms = round(float(np.min(times)) * 1000, 3)
    row.users_per_s = round(row.batch / float(np.mean(times)), 1)
    if reference is not None:
        items, scores = (np.asarray(a) for a in result)
        ref_items, ref_scores = (np.asarray(a) for a in reference)
        row.top10_same_as_cpu = round(float((items == ref_items).mean()), 4)
        finite = np.isfinite(ref_scores)
        diff = np.abs(scores[finite] - ref_scores[finite])
        row.max_score_diff = float(diff.max()) if diff.size else 0.0
    return list(result)


def open_cuda(path: Path, threads: int) -> tuple[ModelVersion | None, str | None]:
    """The version on CUDA, or None and why not."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return None, (
            f"this onnxruntime build ({ort.__version__}, {ort.__file__}) has no CUDA provider; "
            "bench/gpu.sh installs onnxruntime-gpu from carried parts"
        )
    # Importing torch loads CUDA 13 and cuDNN from its nvidia wheels; ORT's CUDA provider
    # finds them by name. bench/gpu.sh also puts them on LD_LIBRARY_PATH, for an ORT that
    # looks before torch has loaded them.
    import torch  # noqa: F401

    try:
        return load_version(path, "cuda", threads), None
    except DeviceUnavailable as e:
        # Its advice names discountd's options; here the log says why (ONNX Runtime's error
        # above, gpu.sh's ldd line).
        return None, f"{str(e).split(';')[0]} (ONNX Runtime's error above says why)"
    except ArtifactError as e:
        return None, str(e)


def torch_device(cpu_checks: bool) -> str | None:
    """Where the PyTorch mode runs: the GPU when torch sees one, else the CPU as a check."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if cpu_checks else None


def describe(ort_module: Any) -> dict[str, Any]:
    import onnx
    import torch
    from onnxruntime.capi import build_and_package_info

    return {
        "python": platform.python_version(),
        "onnxruntime": ort_module.__version__,
        "onnxruntime_package": getattr(build_and_package_info, "package_name", "?"),
        "onnxruntime_cuda": getattr(build_and_package_info, "cuda_version", None),
        "onnxruntime_file": ort_module.__file__,
        "providers_available": ort_module.get_available_providers(),
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(report: Report) -> list[str]:
    out = [
        "| mode | provider | batch | runs | mean ms | min ms | users/s | vs CPU | "
        "top-10 as CPU | max score diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.rows:
        if r.error:
            out.append(f"| {r.mode} | {r.provider} | {r.batch} | failed: {r.error} ||||||")
            continue
        out.append(
            f"| {r.mode} | {r.provider} | {r.batch} | {r.runs} | {fmt(r.mean_ms, '.3f')} | "
            f"{fmt(r.min_ms, '.3f')} | {fmt(r.users_per_s, ',.0f')} | "
            f"{fmt(r.vs_cpu, '.2f')}{'x' if r.vs_cpu is not None else ''} | "
            f"{fmt(r.top10_same_as_cpu, '.1%')} | {fmt(r.max_score_diff, '.1e')} |"
        )
    return out


def write_json(path: Path | None, report: Report) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(asdict(report), indent=2) + "\n")
    staging.replace(path)  # a reader (or a run killed mid-write) never sees half a file


@click.command()
@click.option("--items", default=1_000_000, show_default=True, help="Catalog size.")
@click.option("--users", default=10_000, show_default=True, help="Known users in the version.")
@click.option(
    "--batch", "batches", multiple=True, type=int, default=(1, 32, 256), show_default=True,
    help="Users per inference; repeat for several.",
)  # fmt: skip
@click.option("--warmup", default=3, show_default=True, help="Untimed calls before each row.")
@click.option("--seconds", default=2.0, show_default=True, help="Time per row, about.")
@click.option("--min-runs", default=5, show_default=True, help="Timed calls per row, at least.")
@click.option("--max-runs", default=1000, show_default=True, help="Timed calls per row, at most.")
@click.option(
    "--threads", default=0, show_default=True, help="ORT intra-op threads; 0: a core each."
)
@click.option(
    "--cache", type=click.Path(path_type=Path), default=CACHE, show_default=True,
    help="Where random-factor versions are built once and reused.",
)  # fmt: skip
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write results here.")
@click.option("--require-cuda", is_flag=True, help="Exit 1 when the CUDA provider does not start.")
@click.option(
    "--cpu-checks", is_flag=True,
    help="Also run the IO-binding and PyTorch modes on the CPU (checks that code without a GPU).",
)  # fmt: skip
def main(
    items: int,
    users: int,
    batches: tuple[int, ...],
    warmup: int,
    seconds: float,
    min_runs: int,
    max_runs: int,
    threads: int,
    cache: Path,
    json_path: Path | None,
    require_cuda: bool,
    cpu_checks: bool,
) -> None:
    """Time Recommend's model.onnx on ONNX Runtime's CPU and CUDA providers.

    Example:

        python -m bench.gpu --json var/bench/gpu.json
    """
    import onnxruntime as ort

    timing = {"warmup": warmup, "seconds": seconds, "min_runs": min_runs, "max_runs": max_runs}
    started = time.perf_counter()
    click.echo(f"bench.gpu: version with {items:,} items, {users:,} users ...", err=True)
    store = cached(items, users, cache)
    path = current_version_dir(store)
    click.echo(f"bench.gpu: {path} ready after {time.perf_counter() - started:.0f} s", err=True)
    cpu_model = load_version(path, "cpu", threads)
    cuda_model, why_not = open_cuda(path, threads)
    report = Report(
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        host={"cpu": cpu_name(), "cores": os.cpu_count(), "machine": platform.machine()},
        versions=describe(ort),
        model={
            "path": str(path),
            "version": cpu_model.version,
            "items": cpu_model.manifest.n_items,
            "users": cpu_model.manifest.n_users,
            "categories": cpu_model.manifest.n_categories,
            "k": TOP_K,
            "excluded_per_user": EXCLUDED,
        },
        settings={**timing, "threads": threads, "batches": list(batches)},
        cuda={
            "available": cuda_model is not None,
            "reason": why_not,
            "providers": cuda_model.session.get_providers() if cuda_model else None,
        },
    )
    for key, value in report.versions.items():
        click.echo(f"bench.gpu: {key} = {value}", err=True)
    if cuda_model is None:
        click.echo(f"bench.gpu: CUDA NOT AVAILABLE, CPU rows only: {why_not}", err=True)
    else:
        click.echo(f"bench.gpu: CUDA active: {report.cuda['providers']}", err=True)

    # (mode, provider, the calls for a batch's feeds)
    Calls = Callable[[Feeds], tuple[Callable[[], object], Callable[[], Any]]]
    modes: list[tuple[str, str, Calls]] = [("cpu", CPU, lambda f: run_call(cpu_model, f))]
    if cpu_checks:
        modes.append(
            ("cpu-iobinding-cpu-out", CPU, lambda f: iobinding_call(cpu_model, f, "cpu", False))
        )
    if cuda_model is not None:
        cuda = cuda_model
        modes += [
            ("cuda", CUDA, lambda f: run_call(cuda, f)),
            ("cuda-iobinding-gpu-out", CUDA, lambda f: iobinding_call(cuda, f, "cuda", True)),
            ("cuda-iobinding-cpu-out", CUDA, lambda f: iobinding_call(cuda, f, "cuda", False)),
        ]
    device = torch_device(cpu_checks)
    if device is not None:
        module = eager_graph(items, users)[0].to(device)
        on = device  # a str for the lambda, not str | None
        modes.append((f"torch-{on}", f"PyTorch {on}", lambda f: torch_call(module, f, on)))
    for batch in batches:
        feeds = random_feeds(users, items, cpu_model.manifest.n_categories, batch)
        reference: list[Any] | None = None
        cpu_rate: float | None = None
        for mode, provider, make_calls in modes:
            row = Row(mode, provider, batch)
            result = measure(row, make_calls(feeds), reference if mode != "cpu" else None, timing)
            if mode == "cpu":
                reference, cpu_rate = result, row.users_per_s
            if cpu_rate and row.users_per_s is not None:
                row.vs_cpu = round(row.users_per_s / cpu_rate, 3)
            report.rows.append(row)
            write_json(json_path, report)
            state = row.error or f"{fmt(row.mean_ms, '.3f')} ms, {fmt(row.users_per_s, ',.0f')}/s"
            click.echo(f"bench.gpu: {mode:24s} batch {batch:4d}: {state}", err=True)

    click.echo(
        f"\nRecommend's model.onnx, {items:,} items x {report.model['categories']} categories, "
        f"top {TOP_K}; mean of >= {min_runs} runs (about {seconds:g} s per row) after {warmup} "
        f"warm-up calls; {report.host['cpu']}, {report.host['cores']} cores; "
        f"onnxruntime {report.versions['onnxruntime']}; GPU: {report.versions['gpu'] or 'none'}.\n"
    )
    click.echo("\n".join(table(report)))
    if cuda_model is None:
        click.echo(f"\nCUDA: not measured ({why_not}).")
    if json_path is not None:
        click.echo(f"\nbench.gpu: JSON in {json_path}", err=True)
    click.echo(f"bench.gpu: {time.perf_counter() - started:.0f} s in all", err=True)
    failed = [f"{r.mode} batch {r.batch}" for r in report.rows if r.error]
    if failed:
        raise click.ClickException(f"modes failed: {', '.join(failed)} (errors in the table)")
    if require_cuda and cuda_model is None:
        raise click.ClickException(f"--require-cuda: CUDA did not start: {why_not}")


if __name__ == "__main__":
    sys.exit(main())
