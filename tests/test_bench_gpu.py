"""`make bench-gpu` in miniature, on the CPU: bench.gpu's table and JSON on a small catalog, and
bench/gpu.sh carrying a wheel in parts across calls as a device run does. A device run is rare
and short, so what can break it must break here first. Functional only: no timing is asserted."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench import gpu

ROOT = Path(__file__).resolve().parent.parent
BATCHES = [1, 32, 256]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small version for both bench.gpu tests (each export takes seconds)."""
    return tmp_path_factory.mktemp("gpu-cache")


def test_cpu_rows_table_and_json(tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "out" / "gpu.json"
    args = ["--items", "2000", "--users", "100", "--seconds", "0.05", "--min-runs", "2",
            "--warmup", "1", "--cache", str(cache), "--json", str(out),
            "--cpu-iobinding"]  # fmt: skip
    for batch in BATCHES:
        args += ["--batch", str(batch)]
    result = CliRunner().invoke(gpu.main, args)
    assert result.exit_code == 0, result.output
    assert (
        "| mode | provider | batch | runs | mean ms | min ms | users/s | vs CPU |" in result.output
    )

    report = json.loads(out.read_text())
    assert report["model"]["items"] == 2000 and report["model"]["users"] == 100
    assert {"onnxruntime", "torch", "providers_available"} <= set(report["versions"])
    rows = report["rows"]
    assert all(r["error"] is None and r["runs"] >= 2 and r["users_per_s"] > 0 for r in rows), rows
    cpu = [r for r in rows if r["mode"] == "cpu"]
    assert [r["batch"] for r in cpu] == BATCHES and all(r["vs_cpu"] == 1.0 for r in cpu)
    # The IO-binding code path, run on the CPU provider, must return what session.run returns.
    bound = [r for r in rows if r["mode"] == "cpu-iobinding-cpu-out"]
    assert [r["batch"] for r in bound] == BATCHES
    assert all(r["top10_same_as_cpu"] == 1.0 and r["max_score_diff"] == 0.0 for r in bound)
    cuda = [r for r in rows if r["mode"].startswith("cuda")]
    if report["cuda"]["available"]:  # a machine with a working GPU
        assert {r["mode"] for r in cuda} == {
            "cuda",
            "cuda-iobinding-gpu-out",
            "cuda-iobinding-cpu-out",
        }
    else:
        assert cuda == [] and report["cuda"]["reason"]
        assert "CUDA: not measured" in result.output


def test_require_cuda_fails_without_it_but_keeps_the_cpu_rows(tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "gpu.json"
    result = CliRunner().invoke(
        gpu.main,
        ["--items", "2000", "--users", "100", "--seconds", "0.01", "--min-runs", "1",
         "--warmup", "0", "--batch", "4", "--cache", str(cache), "--json", str(out),
         "--require-cuda"],
    )  # fmt: skip
    report = json.loads(out.read_text())
    if report["cuda"]["available"]:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 1 and "--require-cuda" in result.output
        assert [r["mode"] for r in report["rows"]] == ["cpu"]


def fake_wheel(folder: Path) -> Path:
    """A real, installable wheel named like onnxruntime-gpu's, ~5 KB of incompressible data so
    that 1 KB parts make several."""
    name = "onnxruntime_gpu-0.0.1"
    files = {
        "ortgpu_fake/__init__.py": b"MARK = 'installed from parts'\n",
        "ortgpu_fake/blob.bin": os.urandom(5000),
        f"{name}.dist-info/METADATA": b"Metadata-Version: 2.1\nName: onnxruntime-gpu\n"
        b"Version: 0.0.1\n",
        f"{name}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = [f"{path},sha256={_digest(data)},{len(data)}" for path, data in files.items()]
    files[f"{name}.dist-info/RECORD"] = (
        "\n".join([*record, f"{name}.dist-info/RECORD,,"]) + "\n"
    ).encode()
    wheel = folder / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


def _digest(data: bytes) -> str:
    """RECORD's hash: urlsafe base64 of the sha256, unpadded (PEP 376)."""
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def gpu_sh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "bench/gpu.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        check=False, timeout=60,
    )  # fmt: skip


def ortgpu_env(tmp_path: Path, parts: Path) -> dict[str, str]:
    """gpu.sh's folders under tmp_path, the parts folder (the checkout's .ortgpu), 1 KiB parts."""
    return {
        **os.environ,
        "ORTGPU_PARTS": str(parts),
        "ORTGPU_STASH": str(tmp_path / "stash"),
        "ORTGPU_SITE": str(tmp_path / "site"),
        "ORTGPU_PART_SIZE": "1K",
        "PYTHON": sys.executable,
    }


def test_wheel_travels_in_parts_one_call_each(tmp_path: Path) -> None:
    downloaded = tmp_path / "download"
    downloaded.mkdir()
    wheel = fake_wheel(downloaded)
    here = tmp_path / "here"  # .ortgpu in the checkout
    env = ortgpu_env(tmp_path, here)
    split = gpu_sh("split", str(wheel), env=env)
    assert split.returncode == 0, split.stderr
    parts = sorted(p.name for p in here.glob("part*"))
    sums = (here / "SHA256SUMS").read_text().splitlines()
    assert len(parts) >= 5 and [line.split()[1] for line in sums] == [*parts, wheel.name]

    # Each device call carries SHA256SUMS and one part; only the last one completes the set.
    for i, part in enumerate(parts):
        carried = tmp_path / f"call{i}"
        carried.mkdir()
        (carried / "SHA256SUMS").write_bytes((here / "SHA256SUMS").read_bytes())
        (carried / part).write_bytes((here / part).read_bytes())
        kept = gpu_sh("keep", env={**env, "ORTGPU_PARTS": str(carried)})
        assert kept.returncode == 0 and f"kept {part}" in kept.stderr, kept.stderr
        last = i == len(parts) - 1
        assert ("all parts" in kept.stderr) == last and ("still missing" in kept.stderr) != last
        if i == 0:  # a run with parts missing stops before pip and the benchmark
            early = gpu_sh("install", env={**env, "ORTGPU_PARTS": str(tmp_path / "nothing")})
            assert early.returncode == 1 and "cannot install" in early.stderr

    installed = gpu_sh("install", env={**env, "ORTGPU_PARTS": str(tmp_path / "nothing")})
    assert installed.returncode == 0, installed.stderr
    site = tmp_path / "site"
    assert (site / "onnxruntime_gpu-0.0.1.dist-info").is_dir()
    assert (site / "ortgpu_fake" / "blob.bin").read_bytes() == zipfile.ZipFile(wheel).read(
        "ortgpu_fake/blob.bin"
    )


def test_damaged_part_is_refused(tmp_path: Path) -> None:
    downloaded = tmp_path / "download"
    downloaded.mkdir()
    here = tmp_path / "here"
    env = ortgpu_env(tmp_path, here)
    assert gpu_sh("split", str(fake_wheel(downloaded)), env=env).returncode == 0
    (here / "part1").write_bytes(b"not the part")
    kept = gpu_sh("keep", env=env)
    assert kept.returncode == 1 and "part1 arrived damaged" in kept.stderr
