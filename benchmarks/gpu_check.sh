#!/usr/bin/env bash
# The GPU checks in one run, for a bare single-GPU machine (H100/H200) that has torch,
# torchvision and transformers but no network. Under 12 minutes: every step has a time limit.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [WHEEL_DIR]        # WHEEL_DIR defaults to .whl
#
#   1. installs the wheels in WHEEL_DIR into a private temporary folder (mktemp -d, mode 0700,
#      removed on exit; a fixed /tmp path would let another user of the host plant imports there)
#      with --no-index --no-deps, skipping any project the machine already has (a second numpy
#      or pillow would shadow torch's own)
#   2. benchmarks/bench_loader.py --num-images 128 --out OUT_DIR: the GPU rows (DALI mixed, nvJPEG) beside the CPU
#      rows; without an importable nvidia.dali the DALI rows read "not measured" and nvJPEG still runs
#   3. benchmarks/bench_train.py --gpu-check --out OUT_DIR, when that file exists
#   4. benchmarks/bench_step.py --gpu: the training-step levers (fold, fused, channels_last,
#      compile, buckets) side by side, and activation checkpointing at micro batch 16 and 32
# Everything printed goes to OUT_DIR/gpu_check.log: one log file, because a device run brings
# back at most 8 files and the loader benchmark writes 3 (loader_<gpu>_<date>.md/.json/.png).
#
# Preparing WHEEL_DIR, on a machine with network (x86_64; match the GPU machine's Python):
#   P="--only-binary=:all: --no-deps --python-version 3.12 --implementation cp -d .whl
#      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#   # the loader benchmark: benchmarks/common.py needs psutil; the plot matplotlib (skipped without it);
#   # pixelbert_dist.config needs pyyaml (transformers usually brings it)
#   pip download $P psutil pyyaml matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six
#   # the training benchmark (pixelbert_dist's engine and loader)
#   pip download $P 'webdataset>=1.0.2,<1.1' braceexpand 'safetensors>=0.8,<0.9' einops hjson msgpack \
#       ninja py-cpuinfo annotated-types typing-inspection
#   pip download --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#       --platform manylinux_2_17_x86_64 pydantic      # with deps: it pins the exact pydantic-core
#   pip wheel --no-deps 'deepspeed==0.19.8' -w .whl    # an sdist: builds a wheel here (~6 s, needs torch)
#   # DALI: ~424 MB for nvidia-dali-cuda120 alone, plus its codec libraries
#   pip download $P --extra-index-url https://pypi.nvidia.com 'nvidia-dali-cuda120==2.4.0' \
#       nvidia-nvimgcodec-cu12 nvidia-nvjpeg-cu12 nvidia-nvjpeg2k-cu12 nvidia-libnvcomp-cu12 \
#       nvtx astunparse gast libcst makefun optree
# The device tool carries at most 64 MiB of working tree: everything above but DALI fits
# (~30 MB); DALI must reach the machine another way, or its rows say "not measured".
# WHEEL_DIR inside the repo must be ignored by git (.git/info/exclude) and named in `carry`.

set -uo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [WHEEL_DIR]" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)              # both resolved from the caller's directory
WHEELS=$(cd "${2:-.whl}" 2>/dev/null && pwd || echo "${2:-.whl}")
cd "$(dirname "$0")/.."
REPO=$(pwd)
SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX") || { echo "mktemp -d failed" >&2; exit 1; }
trap 'rm -rf "$SITE"' EXIT
PY=${PYTHON:-python}
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
status=0

step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
$PY -c "import sys, torch, torchvision; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| torchvision', torchvision.__version__, '| cuda', torch.cuda.is_available())"

step "install wheels from $WHEELS into $SITE"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    # the wheels whose project is not installed yet (wheel names use '_' where projects use '-')
    mapfile -t missing < <($PY - "$WHEELS" <<'EOF'
import importlib.metadata as md, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    try:
        md.version(wheel.name.split("-")[0])
        print(f"already installed, skipped: {wheel.name}", file=sys.stderr)
    except md.PackageNotFoundError:
        print(wheel)
EOF
    )
    if [[ ${#missing[@]} -gt 0 ]]; then
        timeout --kill-after=10 90 $PY -m pip install --quiet --no-index --no-deps --target "$SITE" "${missing[@]}" \
            || { echo "pip install failed (rc $?)"; status=1; }
    fi
else
    echo "no wheels in $WHEELS: using what the machine has"
fi
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import nvidia.dali as d; print('nvidia.dali', d.__version__)" 2>/dev/null \
    || echo "nvidia.dali is not importable: the DALI rows will read 'not measured'; nvJPEG rows still run"

step "loader benchmark"
# 128 images, not the default 256: the one-core CPU rows take ~3 min at 256 on a 2-core box
timeout --kill-after=10 210 $PY benchmarks/bench_loader.py --num-images 128 --out "$OUT"
rc=$?
[[ $rc -eq 0 ]] || { echo "bench_loader.py failed (rc $rc; 124 = ran past its 210 s)"; status=1; }

step "training benchmark"
if [[ -f benchmarks/bench_train.py ]]; then
    timeout --kill-after=10 150 $PY benchmarks/bench_train.py --gpu-check --out "$OUT"
    rc=$?
    [[ $rc -eq 0 ]] || { echo "bench_train.py failed (rc $rc; 124 = ran past its 150 s)"; status=1; }
else
    echo "benchmarks/bench_train.py does not exist: training check skipped"
fi

step "training-step levers"
timeout --kill-after=10 300 $PY benchmarks/bench_step.py --gpu --checkpoint-batches 16,32 \
    --rows today,+fold,+channels_last,+compile,all,zero2-today,zero2-all --out "$OUT"
rc=$?
[[ $rc -eq 0 ]] || { echo "bench_step.py failed (rc $rc; 124 = ran past its 300 s)"; status=1; }

step "done (status $status); files in $OUT:"
ls -l "$OUT"
exit $status
