"""`make bench-gpu` in miniature, on the CPU: bench.gpu's table and JSON on a small catalog, and
bench/gpu.sh packing a wheel for one device call and unpacking it there. A device run is rare
and short, so what can break it must break here first. Functional only: no timing is asserted."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench import gpu, gpu_serving, ortgpu

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
            "--cpu-checks"]  # fmt: skip
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
    # PyTorch eager on the same factors must find the same top 10 as the exported graph.
    eager = [r for r in rows if r["mode"] == "torch-cpu"]
    assert [r["batch"] for r in eager] == BATCHES
    assert all(r["top10_same_as_cpu"] == 1.0 and r["max_score_diff"] < 1e-4 for r in eager)
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


def fatbin_blob(*entries: tuple[int, int, bytes]) -> bytes:
    """One fatbin blob of (kind, sm, payload) entries, laid out as bench.ortgpu reads them."""
    body = b""
    for kind, sm, payload in entries:
        header = struct.pack("<HHIQ", kind, 0x0101, 64, len(payload)).ljust(28, b"\0")
        body += (header + struct.pack("<I", sm)).ljust(64, b"\0") + payload
    return struct.pack("<IHHQ", ortgpu.FATBIN_MAGIC, 1, 16, len(body)) + body


def elf_with(section_name: str, data: bytes) -> bytes:
    """A minimal ELF64 file: its header, `data`, the section names, and three section
    headers (none, the named section, the names)."""
    names = b"\0" + section_name.encode() + b"\0.shstrtab\0"
    data_at = 64
    names_at = data_at + len(data)
    headers_at = (names_at + len(names) + 7) // 8 * 8
    header = b"\x7fELF\x02\x01\x01".ljust(16, b"\0")
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, headers_at, 0, 64, 0, 0, 64, 3, 2)
    sections = bytes(64)
    sections += struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, data_at, len(data), 0, 0, 8, 0)
    sections += struct.pack(
        "<IIQQQQIIQQ", 2 + len(section_name), 3, 0, 0, names_at, len(names), 0, 0, 1, 0
    )
    return (header + data + names).ljust(headers_at, b"\0") + sections


SM80, SM90, SM120, PTX = (os.urandom(3000) for _ in range(4))


TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"  # gpu.sh unpacks builds for it only


def fake_wheel(
    folder: Path, keep_sm: int = 90, fatbin: bytes | None = None, tag: str = TAG
) -> Path:
    """An onnxruntime-gpu-like wheel whose CUDA provider holds two fatbin blobs (kernels for
    sm_80, sm_{keep_sm}, sm_120 and PTX), with an 8-byte gap between them as the linker leaves;
    or the given fatbin."""
    if fatbin is None:
        fatbin = (
            fatbin_blob((2, 80, SM80), (2, keep_sm, SM90))
            + bytes(8)
            + fatbin_blob((1, 80, PTX), (2, 120, SM120))
        )
    name = "onnxruntime_gpu-0.0.1"
    files = {
        "onnxruntime/__init__.py": b"MARK = 'unpacked'\n",
        ortgpu.CUDA_PROVIDER: elf_with(".nv_fatbin", fatbin),
        "onnxruntime/capi/libonnxruntime.so.0.0.1": b"C API",
        "onnxruntime/capi/libonnxruntime_providers_tensorrt.so": b"TensorRT",
        f"{name}.dist-info/METADATA": b"Metadata-Version: 2.1\nName: onnxruntime-gpu\n",
    }
    wheel = folder / f"{name}-{tag}-{tag}-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in files.items():
            info = zipfile.ZipInfo(path)
            info.external_attr = (0o755 if ".so" in path else 0o644) << 16  # as pip's wheels
            z.writestr(info, data)
    return wheel


def gpu_sh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "bench/gpu.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        check=False, timeout=60,
    )  # fmt: skip


def ortgpu_env(tmp_path: Path) -> dict[str, str]:
    """gpu.sh's folders under tmp_path: the packed archive (the checkout's .ortgpu, carried)
    and the site it is unpacked into on the device."""
    return {
        **os.environ,
        "ORTGPU_PACKED": str(tmp_path / "packed"),
        "ORTGPU_SITE": str(tmp_path / "site"),
        "PYTHON": sys.executable,
    }


def test_pack_keeps_only_the_kernels_the_gpu_runs(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path)
    env = ortgpu_env(tmp_path)
    packed = gpu_sh("pack", str(wheel), env=env)
    assert packed.returncode == 0, packed.stderr
    assert "kept 1 sm_90 kernel images" in packed.stderr
    sums = (tmp_path / "packed" / "SHA256SUMS").read_text().split()
    assert sums[1::2] == [ortgpu.ARCHIVE, wheel.name]

    unpacked = gpu_sh("install", env=env)
    assert unpacked.returncode == 0, unpacked.stderr
    site = tmp_path / "site"
    assert (site / "onnxruntime" / "__init__.py").read_bytes() == b"MARK = 'unpacked'\n"
    assert (site / "onnxruntime_gpu-0.0.1.dist-info" / "METADATA").is_file()
    assert not list((site / "onnxruntime" / "capi").glob("libonnxruntime.so*"))
    assert not list((site / "onnxruntime" / "capi").glob("*tensorrt*"))
    provider = site / ortgpu.CUDA_PROVIDER
    original = zipfile.ZipFile(wheel).read(ortgpu.CUDA_PROVIDER)
    data = provider.read_bytes()
    assert len(data) == len(original) and os.access(provider, os.X_OK)
    # Same layout; sm_90's kernels and the PTX as they were, the other kernels zeros.
    for payload, kept in ((SM90, True), (PTX, True), (SM80, False), (SM120, False)):
        at = original.index(payload)
        assert data[at : at + len(payload)] == (payload if kept else bytes(len(payload)))
    assert data.replace(b"\0", b"") == original.replace(SM80, b"").replace(SM120, b"").replace(
        b"\0", b""
    )

    again = gpu_sh("install", env=env)  # a rerun on the warm machine keeps what is there
    assert again.returncode == 0 and "already unpacked" in again.stderr


def test_an_archive_for_another_python_is_not_unpacked(tmp_path: Path) -> None:
    env = ortgpu_env(tmp_path)
    assert gpu_sh("pack", str(fake_wheel(tmp_path, tag="cp39")), env=env).returncode == 0
    refused = gpu_sh("install", env=env)
    assert refused.returncode == 1 and f"not a build for this Python ({TAG})" in refused.stderr
    assert not (tmp_path / "site").exists()


def test_damaged_archive_is_refused(tmp_path: Path) -> None:
    env = ortgpu_env(tmp_path)
    assert gpu_sh("pack", str(fake_wheel(tmp_path)), env=env).returncode == 0
    archive = tmp_path / "packed" / ortgpu.ARCHIVE
    archive.write_bytes(archive.read_bytes()[:-10])
    unpacked = gpu_sh("install", env=env)
    assert unpacked.returncode == 1 and "arrived damaged" in unpacked.stderr
    assert not (tmp_path / "site").exists()
    missing = gpu_sh("install", env={**env, "ORTGPU_PACKED": str(tmp_path / "nothing")})
    assert missing.returncode == 1 and "carry" in missing.stderr


def test_pack_refuses_a_wheel_without_the_gpus_kernels(tmp_path: Path) -> None:
    env = ortgpu_env(tmp_path)
    no_sm90 = gpu_sh("pack", str(fake_wheel(tmp_path, keep_sm=89)), env=env)
    assert no_sm90.returncode == 1 and "no kernels built for sm_90" in no_sm90.stderr
    cpu_wheel = tmp_path / "onnxruntime-1.0-py3-none-any.whl"
    with zipfile.ZipFile(cpu_wheel, "w") as z:
        z.writestr("onnxruntime/__init__.py", "")
    refused = gpu_sh("pack", str(cpu_wheel), env=env)
    assert refused.returncode == 1 and "not onnxruntime-gpu" in refused.stderr
    assert "Traceback" not in no_sm90.stderr + refused.stderr


def test_serving_rows_name_the_provider_each_server_reports(tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "serving.json"
    result = CliRunner().invoke(
        gpu_serving.main,
        ["--device", "cpu", "--items", "2000", "--users", "100", "--duration", "0.3",
         "--warmup", "5", "--cache", str(cache), "--json", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["providers"] == {"cpu": "CPUExecutionProvider"}
    rows = report["rows"]
    assert [r["scenario"].split(", --device")[0] for r in rows] == [
        run[0] for run in gpu_serving.RUNS
    ]
    assert all(r["load"]["requests"] > 0 and not r["load"]["errors"] for r in rows), rows
    assert "| Recommend, batched, 4 workers, --device cpu (CPUExecutionProvider) |" in result.output


def test_a_fatbin_it_cannot_read_is_refused_and_the_last_archive_kept(tmp_path: Path) -> None:
    env = ortgpu_env(tmp_path)
    assert gpu_sh("pack", str(fake_wheel(tmp_path)), env=env).returncode == 0
    packed = tmp_path / "packed"
    before = {f.name: f.read_bytes() for f in packed.iterdir()}
    blob = bytearray(fatbin_blob((2, 90, SM90)))
    struct.pack_into("<Q", blob, 16 + 8, len(SM90) + 1)  # the entry's payload runs past its blob
    broken = tmp_path / "broken"
    broken.mkdir()
    refused = gpu_sh("pack", str(fake_wheel(broken, fatbin=bytes(blob))), env=env)
    assert refused.returncode == 1 and "runs past its blob" in refused.stderr, refused.stderr
    assert {f.name: f.read_bytes() for f in packed.iterdir()} == before
