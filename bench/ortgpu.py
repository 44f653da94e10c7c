"""Pack onnxruntime-gpu's wheel into one archive that fits one device call (bench/gpu.sh pack).

The wheel is ~255 MB and a device call carries at most 64 MiB. Most of it is the CUDA
provider's kernels, compiled for every GPU generation (sm_75 to sm_120); a GPU runs only the
ones built for its own architecture. So the archive keeps the wheel's Python package and its
CUDA provider, with every other architecture's kernels overwritten by zeros (same sizes and
offsets, so the library's layout is untouched, and zeros compress to nothing), and leaves out
what the Python binding never loads: the C API library (the binding links ONNX Runtime
statically) and the TensorRT provider. For sm_90 (H100, H200): ~58 MiB of xz.

A fatbin (section .nv_fatbin) is a run of blobs, each a 16-byte header (magic, version,
header size, size of its entries) then entries: a header (kind 1 PTX or 2 ELF, header size,
payload size, target architecture at byte 28) and the payload. Only ELF entries for other
architectures are blanked: PTX, which any newer GPU can compile, is kept.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import struct
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import click

FATBIN_MAGIC = 0xBA55ED50
ELF_ENTRY = 2
CUDA_PROVIDER = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
# Not loaded by `import onnxruntime` or its CUDA provider (their NEEDED entries name neither).
LEFT_OUT = (
    "onnxruntime/capi/libonnxruntime.so",
    "onnxruntime/capi/libonnxruntime_providers_tensorrt",
)
ARCHIVE = "onnxruntime-gpu.tar.xz"
MAX_CARRY = 60 * 2**20  # a call's 64 MiB less the ~2 MiB working tree beside it


class PackError(Exception):
    pass


@dataclass
class Blanked:
    kept: int = 0  # payload bytes of kept entries
    blanked: int = 0
    entries_kept: int = 0


def section(elf: bytes | bytearray, name: str) -> tuple[int, int]:
    """(file offset, size) of an ELF64 little-endian file's section `name`."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise PackError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        name_at, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        return name_at, offset, size

    _, names_at, _ = header(shstrndx)
    for i in range(shnum):
        name_at, offset, size = header(i)
        start = names_at + name_at
        if bytes(elf[start : elf.index(b"\0", start)]).decode() == name:
            return offset, size
    raise PackError(f"no {name} section")


def blank_other_architectures(elf: bytearray, keep_sm: int) -> Blanked:
    """Zero, in place, the payload of each ELF fatbin entry not built for sm_<keep_sm>."""
    offset, size = section(elf, ".nv_fatbin")
    done = Blanked()
    pos, end = offset, offset + size
    while pos < end:
        magic, _, blob_header, entries_size = struct.unpack_from("<IHHQ", elf, pos)
        if magic != FATBIN_MAGIC:
            if any(elf[pos : pos + 8]):  # blobs are 8-byte aligned; the gaps hold zeros
                raise PackError(f"unknown fatbin layout at byte {pos - offset} of .nv_fatbin")
            pos += 8
            continue
        entry, blob_end = pos + blob_header, pos + blob_header + entries_size
        if blob_header < 16 or blob_end > end:
            raise PackError(f"fatbin blob at byte {pos - offset} runs past .nv_fatbin")
        while entry < blob_end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", elf, entry)
            (sm,) = struct.unpack_from("<I", elf, entry + 28)
            start = entry + entry_header
            if entry_header < 32 or start + payload > blob_end:
                raise PackError(f"fatbin entry at byte {entry - offset} runs past its blob")
            if kind == ELF_ENTRY and sm != keep_sm:
                elf[start : start + payload] = bytes(payload)
                done.blanked += payload
            else:
                done.kept += payload
                done.entries_kept += kind == ELF_ENTRY and sm == keep_sm
            entry = start + payload
        pos = blob_end
    if not done.entries_kept:
        raise PackError(f"no kernels built for sm_{keep_sm}: the GPU could run nothing")
    return done


def pack(wheel: Path, out: Path, keep_sm: int) -> tuple[Path, Blanked]:
    """Write out/ARCHIVE and out/SHA256SUMS (the archive's, then the wheel's); a pack that
    fails leaves what was there."""
    out.mkdir(parents=True, exist_ok=True)
    archive, staging = out / ARCHIVE, out / f"{ARCHIVE}.incoming"
    with zipfile.ZipFile(wheel) as z:
        if CUDA_PROVIDER not in z.namelist():
            raise PackError(f"{wheel.name} has no {CUDA_PROVIDER}: not onnxruntime-gpu")
        try:
            done = _write(z, staging, keep_sm)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
    if staging.stat().st_size > MAX_CARRY:
        size = staging.stat().st_size / 2**20
        staging.unlink()
        raise PackError(
            f"the archive would be {size:.1f} MiB, over the {MAX_CARRY / 2**20:.0f} MiB one "
            "device call can carry beside the working tree"
        )
    staging.replace(archive)
    sums = [f"{sha256(archive)}  {ARCHIVE}", f"{sha256(wheel)}  {wheel.name}"]
    (out / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return archive, done


def _write(z: zipfile.ZipFile, path: Path, keep_sm: int) -> Blanked:
    done = Blanked()
    with lzma.open(path, "wb", preset=9) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for info in z.infolist():
            if info.is_dir() or info.filename.startswith(LEFT_OUT):
                continue
            data = z.read(info)
            if info.filename == CUDA_PROVIDER:
                provider = bytearray(data)
                done = blank_other_architectures(provider, keep_sm)
                data = bytes(provider)
            member = tarfile.TarInfo(info.filename)
            member.size = len(data)
            member.mode = (info.external_attr >> 16) & 0o777 or 0o644  # as the wheel has it
            tar.addfile(member, io.BytesIO(data))
    return done


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


@click.command()
@click.argument("wheel", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".ortgpu"),
    show_default=True,
    help="Folder for the archive and SHA256SUMS (git must ignore it).",
)
@click.option("--keep-sm", default=90, show_default=True,
              help="GPU architecture whose kernels are kept: 90 for H100 and H200.")  # fmt: skip
def main(wheel: Path, out: Path, keep_sm: int) -> None:
    """Pack onnxruntime-gpu's WHEEL into OUT/onnxruntime-gpu.tar.xz for one device call."""
    click.echo(f"ortgpu: packing {wheel.name} for sm_{keep_sm} (a minute or two) ...", err=True)
    try:
        archive, done = pack(wheel, out, keep_sm)
    except PackError as e:
        raise click.ClickException(str(e)) from None
    except zipfile.BadZipFile as e:
        raise click.ClickException(f"{wheel}: {e}") from None
    click.echo(
        f"ortgpu: {archive} ({archive.stat().st_size / 2**20:.1f} MiB): kept "
        f"{done.entries_kept} sm_{keep_sm} kernel images ({done.kept / 2**20:.0f} MiB with "
        f"any PTX), blanked {done.blanked / 2**20:.0f} MiB of other architectures' kernels",
        err=True,
    )


if __name__ == "__main__":
    sys.exit(main())
