"""Generate the Python gRPC stubs (with .pyi) from protos/ into discount/.

One function so that `make protos` and the drift test produce byte-identical output.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = "discount"


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs for every .proto under protos/ into out_dir; return the files written."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for package_dir in {p.parent for p in out_dir.rglob("*_pb2.py")} | {out_dir / OUT_PACKAGE}:
        init = package_dir / "__init__.py"
        init.touch()
        written.append(init)
    return sorted(set(written) | set(out_dir.rglob("*_pb2*.py*")))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        target = ROOT / OUT_PACKAGE / "v1"
        shutil.rmtree(target, ignore_errors=True)
        for f in files:
            dest = ROOT / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
            print(f"wrote {dest.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
