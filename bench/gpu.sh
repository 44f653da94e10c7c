#!/usr/bin/env bash
# ONNX Runtime's CUDA provider against its CPU provider for Recommend's graph over 1M items
# (issue #6), in one run: `make bench-gpu` here, `bash bench/gpu.sh` on a device machine.
#
# The device machine (nvidia-h200: Python 3.12, torch 2.11 cu130, CUDA 13 and cuDNN 9 as pip
# wheels) has onnxruntime 1.30's CPU build only, can download nothing, and each call carries at
# most 64 MiB of working tree. onnxruntime-gpu's wheel (~255 MB) would take five calls, so
# bench/ortgpu.py packs it into one archive of ~58 MiB that keeps only the kernels the GPU can
# run (its docstring says how; the archive runs CUDA on that architecture alone, sm_90 unless
# --keep-sm says otherwise), and one call carries it, installs it into /tmp/site and runs the
# benchmark.
#
# Here, once, with network, in the repository root (.gitignore ignores .ortgpu/):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d /tmp/ortgpu-wheel \
#       onnxruntime-gpu==1.31.1
#   bash bench/gpu.sh pack /tmp/ortgpu-wheel/onnxruntime_gpu-1.31.1-*.whl
#       -> .ortgpu/onnxruntime-gpu.tar.xz and .ortgpu/SHA256SUMS
# The device call (tool `run`):
#   carry [".ortgpu"]  command "bash bench/gpu.sh"  timeout_s 480
# Results: $OUT/gpu.json and $OUT/gpu.log there (var/bench/ when OUT is unset, as here).
#
# discountd itself on the GPU (`serve`: bench/gpu_serving.py, Recommend over gRPC with --device
# cuda, then cpu) needs discountd's own packages too, which the image lacks or has too old: ~17 MB
# of wheels that do not fit beside the archive. Here (.gitignore ignores .whl/):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl grpcio==1.85.3 grpcio-health-checking==1.85.1 \
#       grpcio-reflection==1.85.1 grpcio-status==1.85.3 protobuf==7.36.2 \
#       googleapis-common-protos==1.76.0 SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3 \
#       psycopg==3.3.9 psycopg-binary==3.3.9 prometheus_client==0.26.0
# then two calls back to back (the machine, and /tmp/site with it, goes back 30 s after a call):
#   carry [".ortgpu"]  command "bash bench/gpu.sh install"
#   carry [".whl"]     command "bash bench/gpu.sh install-server && bash bench/gpu.sh serve"
#                      timeout_s 480
# Results: $OUT/gpu_serving.json and gpu_serving.log. docs/BENCHMARKS.md's "GPU" tables came
# from these, and from `bash bench/gpu.sh -- --batch 1 --batch 32 --batch 256 --batch 1024`.
#
# Subcommands: pack WHEEL [--keep-sm N] (here), install (check and unpack the carried archive),
# install-server (device only: the carried wheels and discountd into its Python), serve [ARGS]
# (bench.gpu_serving ARGS), none: install when the archive is carried, then `python -m
# bench.gpu`. Extra arguments after `--` go to bench.gpu. Exit status non-zero when any step or
# any measured mode fails, and on a machine with nvidia-smi when the CUDA provider does not
# start. An archive packed for another Python is left alone (as after `pack` here).
set -euo pipefail

PACKED=${ORTGPU_PACKED:-.ortgpu}      # the archive and SHA256SUMS, in the repository
SITE=${ORTGPU_SITE:-/tmp/site}         # where onnxruntime-gpu is unpacked
WHEELS=${ORTGPU_WHEELS:-.whl}          # discountd's packages, for serve
PYTHON=${PYTHON:-python3}
ARCHIVE=onnxruntime-gpu.tar.xz

say() { echo "gpu.sh: $*" >&2; }
die() { say "$*"; exit 1; }

pack() {
    # Untracked files that git does not ignore travel with every call, and two copies of the
    # archive would not fit. (Exit 128: outside a git checkout, as in tests.)
    local ignored=0
    git check-ignore -q "$PACKED/$ARCHIVE" 2>/dev/null || ignored=$?
    ((ignored != 1)) || die "$PACKED is not ignored by git: add /$PACKED/ to .gitignore"
    "$PYTHON" -m bench.ortgpu --out "$PACKED" "$@"
}

python_tag() { "$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])'; }

# The wheel the archive was packed from (SHA256SUMS' last line), e.g. ...-cp312-cp312-....whl
packed_wheel() { tail -n 1 "$PACKED/SHA256SUMS" | awk '{print $2}'; }

install() {
    [[ -f $PACKED/$ARCHIVE && -f $PACKED/SHA256SUMS ]] ||
        die "no $PACKED/$ARCHIVE and SHA256SUMS carried: carry [\"$PACKED\"]"
    (cd "$PACKED" && grep " $ARCHIVE\$" SHA256SUMS | sha256sum -c --quiet -) ||
        die "$ARCHIVE arrived damaged (its sha256 is not the one in SHA256SUMS): carry it again"
    local sum tag
    tag=$(python_tag)
    [[ $(packed_wheel) == *-$tag-* ]] ||
        die "$ARCHIVE holds $(packed_wheel), not a build for this Python ($tag)"
    sum=$(grep " $ARCHIVE\$" "$PACKED/SHA256SUMS" | awk '{print $1}')
    if [[ $(cat "$SITE/.ortgpu" 2>/dev/null) == "$sum $tag" ]]; then
        say "onnxruntime-gpu already unpacked in $SITE"
        return 0
    fi
    rm -rf "$SITE"/onnxruntime "$SITE"/onnxruntime_gpu-*.dist-info
    mkdir -p "$SITE"
    # Python's tarfile: the machine may have no xz.
    "$PYTHON" -c 'import sys, tarfile
tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$PACKED/$ARCHIVE" "$SITE"
    echo "$sum $tag" >"$SITE/.ortgpu" # what is there, for a rerun and for prepare
    say "unpacked $(packed_wheel) (packed) into $SITE"
}

# For the device machine: discountd and the carried wheels of its packages into its Python,
# where bench.serving looks for the discountd and discountctl it starts (beside
# sys.executable). Not for a checkout's venv: it would replace the editable install.
install_server() {
    local wheels=("$WHEELS"/*.whl) tag
    [[ -f ${wheels[0]} ]] || die "no $WHEELS/*.whl carried: carry [\"$WHEELS\"]"
    tag=$(python_tag)
    ls "$WHEELS"/grpcio-*-"$tag"-*.whl >/dev/null 2>&1 ||
        die "$WHEELS holds no grpcio wheel for this Python ($tag): they are for another machine"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "${wheels[@]}"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-build-isolation .
    say "installed discountd and ${#wheels[@]} wheels beside $PYTHON"
}

# Shared-library folders of the nvidia-* wheels (CUDA 13 in nvidia/cu13/lib, cuDNN in
# nvidia/cudnn/lib) beside torch: ORT's CUDA provider has no RUNPATH to them, and the dynamic
# loader reads LD_LIBRARY_PATH only when a process starts.
nvidia_libs() {
    "$PYTHON" - <<'EOF'
import glob
import os
import site

roots = site.getsitepackages() + [site.getusersitepackages()]
found = [d for r in roots for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib")))]
print(":".join(dict.fromkeys(found)))
EOF
}

# Install what was carried, put it and the CUDA libraries in reach, and say what is there.
prepare() {
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
        REQUIRE=(--require-cuda) # a GPU machine that cannot run CUDA is a failed run
    else
        say "no NVIDIA GPU here: no CUDA"
    fi
    local tag
    tag=$(python_tag)
    if [[ -f $PACKED/$ARCHIVE && -f $PACKED/SHA256SUMS && $(packed_wheel) != *-$tag-* ]]; then
        # As after `pack` here: the archive is for the device's Python, not this one.
        say "$PACKED/$ARCHIVE is not for this Python ($tag): using the installed onnxruntime"
    elif [[ -f $PACKED/$ARCHIVE ]]; then
        install
    fi
    if [[ $(cut -d' ' -f2 "$SITE/.ortgpu" 2>/dev/null) == "$tag" ]]; then
        # Ahead of site-packages, so it shadows the machine's CPU-only onnxruntime.
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    else
        say "no onnxruntime-gpu unpacked for this Python: using the installed onnxruntime"
    fi
    local libs
    libs=$(nvidia_libs)
    for extra in /usr/local/nvidia/lib64 /usr/local/cuda/lib64; do
        [[ -d $extra ]] && libs=${libs:+$libs:}$extra
    done
    export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export PYTHONUNBUFFERED=1
    "$PYTHON" -c 'import sys, onnxruntime as o, torch
print(f"gpu.sh: Python {sys.version.split()[0]}, onnxruntime {o.__version__} from {o.__file__}, "
      f"providers {o.get_available_providers()}, torch {torch.__version__}, "
      f"CUDA seen by torch: {torch.cuda.is_available()}", file=sys.stderr)'
    if ((${#REQUIRE[@]})); then
        local provider
        provider=$("$PYTHON" -c 'import onnxruntime, pathlib
print(pathlib.Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so")')
        if [[ -f $provider ]]; then
            # A library the provider cannot find is the usual reason CUDA falls back to CPU.
            ldd "$provider" | grep 'not found' >&2 || say "ldd: every library of $provider found"
        fi
    fi
}

main() {
    case ${1:-} in
        pack) shift; pack "$@" ;;
        install) install ;;
        install-server) install_server ;;
        serve)
            shift
            prepare
            "$PYTHON" -m bench.gpu_serving --json "$OUT_DIR/gpu_serving.json" "$@"
            ;;
        --|"")
            [[ -z ${1:-} ]] || shift
            prepare
            "$PYTHON" -m bench.gpu --json "$OUT_DIR/gpu.json" "${REQUIRE[@]}" "$@"
            ;;
    esac
}

OUT_DIR=${OUT:-var/bench}
REQUIRE=()
case ${1:-} in
    pack | install | install-server | serve | -- | "") ;;
    *) die "unknown subcommand $1 (pack WHEEL | install | install-server | serve | -- BENCH_ARGS)" ;;
esac
if [[ ${1:-} == pack || ${1:-} == install || ${1:-} == install-server ]]; then
    main "$@"
else
    log=$OUT_DIR/gpu.log
    [[ ${1:-} != serve ]] || log=$OUT_DIR/gpu_serving.log
    mkdir -p "$OUT_DIR"
    # The whole log beside the JSON: the device tool returns only the output's last 12,000 chars.
    # (pipefail: the script exits with main's status.)
    main "$@" 2>&1 | tee "$log"
fi
