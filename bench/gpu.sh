#!/usr/bin/env bash
# ONNX Runtime's CUDA provider against its CPU provider for Recommend's graph over 1M items
# (issue #6), in one run: `make bench-gpu` here, `bash bench/gpu.sh` on a device machine.
#
# The device machine (nvidia-h200: Python 3.12, torch 2.11 cu130, CUDA 13 and cuDNN 9 as pip
# wheels) has onnxruntime 1.30's CPU build only, can download nothing, and each call carries at
# most 64 MiB of working tree. So onnxruntime-gpu's wheel (~255 MB) travels in parts of 56 MiB
# (the ~1.5 MB tree beside one part stays under 64 MiB), one part per call into /tmp/ortgpu
# there, and the last call reassembles it, checks its sha256, installs it into /tmp/site and runs
# the benchmark. The parts live only as long as that machine: it goes back 30 s after a call, so
# the calls must follow each other at once (a fresh machine starts with none: begin again).
#
# Here, once, with network, in the repository root:
#   echo /.ortgpu/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d /tmp/ortgpu-wheel \
#       onnxruntime-gpu==1.31.1
#   bash bench/gpu.sh split /tmp/ortgpu-wheel/onnxruntime_gpu-1.31.1-*.whl
#       -> .ortgpu/part0 .. .ortgpu/partN and .ortgpu/SHA256SUMS (parts, then the wheel)
# Device calls, back to back (tool `run`):
#   carry [".ortgpu/SHA256SUMS", ".ortgpu/part0"]  command "bash bench/gpu.sh keep"
#   ... the same for part1 .. part(N-1)
#   carry [".ortgpu/SHA256SUMS", ".ortgpu/partN"]  command "bash bench/gpu.sh"  timeout_s 480
# Results: $OUT/gpu.json and $OUT/gpu.log there (var/bench/ when OUT is unset, as here).
#
# Subcommands: split WHEEL (here), keep (store carried parts), install (reassemble and install),
# none: keep, install when parts are present, then `python -m bench.gpu`. Extra arguments after
# `--` go to bench.gpu. Exit status non-zero when any step or any measured mode fails, and on a
# machine with nvidia-smi when the CUDA provider does not start.
set -euo pipefail

PARTS=${ORTGPU_PARTS:-.ortgpu}        # carried parts and SHA256SUMS, in the repository
STASH=${ORTGPU_STASH:-/tmp/ortgpu}     # where parts gather across calls on the device
SITE=${ORTGPU_SITE:-/tmp/site}         # pip --target for onnxruntime-gpu
PART_SIZE=${ORTGPU_PART_SIZE:-56M}     # split -b size
PYTHON=${PYTHON:-python3}

say() { echo "gpu.sh: $*" >&2; }
die() { say "$*"; exit 1; }

split_wheel() {
    local wheel=${1:?usage: bench/gpu.sh split WHEEL}
    [[ -f $wheel && $wheel == *.whl ]] || die "$wheel is not a wheel file"
    # Untracked files that git does not ignore travel with every call: all parts at once would
    # be far over 64 MiB. (Exit 128: the parts folder is outside a git checkout, as in tests.)
    local ignored=0
    git check-ignore -q "$PARTS/SHA256SUMS" 2>/dev/null || ignored=$?
    ((ignored != 1)) || die "$PARTS is not ignored: echo /.ortgpu/ >> .git/info/exclude first"
    mkdir -p "$PARTS"
    rm -f "$PARTS"/part* "$PARTS/SHA256SUMS"
    split -b "$PART_SIZE" -d -a 1 "$wheel" "$PARTS/part"
    # Parts first, the whole wheel last: `keep` checks each part as it arrives, `install` the
    # reassembled wheel, and the last line names the file pip must see.
    (cd "$PARTS" && sha256sum part*) >"$PARTS/SHA256SUMS"
    (cd "$(dirname "$wheel")" && sha256sum "$(basename "$wheel")") >>"$PARTS/SHA256SUMS"
    say "$(grep -c ' part' "$PARTS/SHA256SUMS") parts of $PART_SIZE in $PARTS:"
    ls -l "$PARTS" >&2
}

wheel_name() { tail -n 1 "$STASH/SHA256SUMS" | awk '{print $2}'; }

# Copy the parts this call carried into the stash, check them, and say which are still missing
# (not an error: the calls before the last carry one part each).
keep() {
    mkdir -p "$STASH"
    if [[ -f $PARTS/SHA256SUMS ]]; then
        cp "$PARTS/SHA256SUMS" "$STASH/"
    fi
    [[ -f $STASH/SHA256SUMS ]] ||
        die "no $PARTS/SHA256SUMS carried or kept: carry it with each part"
    local part
    for part in "$PARTS"/part*; do
        [[ -f $part ]] || continue
        cp "$part" "$STASH/"
        (cd "$STASH" && grep " $(basename "$part")\$" SHA256SUMS | sha256sum -c --quiet -) ||
            die "$(basename "$part") arrived damaged: carry it again"
        say "kept $(basename "$part") ($(du -h "$part" | cut -f1)) in $STASH"
    done
    local missing
    missing=$(missing_parts)
    if [[ -n $missing ]]; then
        say "still missing:" $missing "(carry each with $PARTS/SHA256SUMS)"
    else
        say "all parts of $(wheel_name) are in $STASH"
    fi
}

missing_parts() {
    local part
    for part in $(grep ' part' "$STASH/SHA256SUMS" | awk '{print $2}'); do
        [[ -f $STASH/$part ]] || echo "$part"
    done
}

install() {
    local wheel missing
    wheel=$(wheel_name)
    missing=$(missing_parts)
    [[ -z $missing ]] || die "cannot install onnxruntime-gpu: missing" $missing
    if ls "$SITE"/onnxruntime_gpu-*.dist-info >/dev/null 2>&1; then
        say "onnxruntime-gpu already installed in $SITE"
        return 0
    fi
    (cd "$STASH" && cat $(grep ' part' SHA256SUMS | awk '{print $2}') >"$wheel" &&
        grep " $wheel\$" SHA256SUMS | sha256sum -c --quiet -) ||
        die "the reassembled $wheel does not match SHA256SUMS"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$STASH/$wheel"
    say "installed $wheel into $SITE"
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

run() {
    local out=${OUT:-var/bench}
    mkdir -p "$out"
    local require=()
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
        require=(--require-cuda) # a GPU machine that cannot run CUDA is a failed run
    else
        say "no NVIDIA GPU here: CPU rows only"
    fi
    if [[ -f $PARTS/SHA256SUMS || -f $STASH/SHA256SUMS ]]; then
        keep
        install
    else
        say "no onnxruntime-gpu parts ($PARTS, $STASH): using the installed onnxruntime"
    fi
    if ls "$SITE"/onnxruntime_gpu-*.dist-info >/dev/null 2>&1; then
        # Ahead of site-packages, so it shadows the machine's CPU-only onnxruntime.
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
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
    if ((${#require[@]})); then
        local provider
        provider=$("$PYTHON" -c 'import onnxruntime, pathlib
print(pathlib.Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so")')
        if [[ -f $provider ]]; then
            # A library the provider cannot find is the usual reason CUDA falls back to CPU.
            ldd "$provider" | grep 'not found' >&2 || say "ldd: every library of $provider found"
        fi
    fi
    "$PYTHON" -m bench.gpu --json "$out/gpu.json" "${require[@]}" "$@"
}

main() {
    case ${1:-} in
        split) shift; split_wheel "$@" ;;
        keep) keep ;;
        install) keep; install ;;
        --) shift; run "$@" ;;
        "") run ;;
        *) die "unknown subcommand $1 (split WHEEL | keep | install | -- BENCH_ARGS)" ;;
    esac
}

if [[ ${1:-} == split || ${1:-} == keep || ${1:-} == install ]]; then
    main "$@"
else
    log=${OUT:-var/bench}/gpu.log
    mkdir -p "$(dirname "$log")"
    # The whole log beside the JSON: the device tool returns only the output's last 12,000 chars.
    main "$@" 2>&1 | tee "$log"
    exit "${PIPESTATUS[0]}"
fi
