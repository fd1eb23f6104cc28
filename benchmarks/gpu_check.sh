#!/usr/bin/env bash
# The GPU checks in one run, for a bare single-GPU machine (H100/H200) that has torch,
# torchvision and transformers but no network. It ends within GPU_CHECK_BUDGET_S seconds
# (default 450: inside an 8-minute window with the machine's start), installs included.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [WHEEL_DIR]        # WHEEL_DIR defaults to .whl
#
# In this order, the most decisive first; what the deadline cuts off is named in the summary:
#   1. machine: GPU, driver, Python and torch versions
#   2. the wheels in WHEEL_DIR installed into a private temporary folder (mktemp -d, mode 0700,
#      removed on exit; a fixed /tmp path would let another user of the host plant imports there)
#      with --no-index --no-deps, skipping any project the machine already has (a second numpy
#      or pillow would shadow torch's own)
#   3. the GPU tests, pytest -m gpu: each CUDA generator's state round trip, resume exactness on
#      CUDA (the same losses with dropout and pixel sampling drawing there), no synchronizing
#      copy in a training step, pinned batches, the training step's memory peak
#   4. the loader's decode: PIL and torchvision on one CPU core at 224/384 and 800/1333, DALI
#      (CPU and GPU) where nvidia.dali imports, nvJPEG (benchmarks/bench_loader.py)
#   5. the training-step levers at R50 800x1333 bf16 (benchmarks/bench_step.py --gpu): today,
#      ZeRO-2 today, today at micro batch 32, all levers, ZeRO-2 all levers, all at micro batch
#      32, in that order; each row is appended to OUT_DIR/step_*.rows.jsonl the moment it is measured
#   6. the summary: every step's status and time, the step rows measured, GPU processes left
#
# Every step runs in a process group of its own (setsid) watched by a timer: at the step's limit
# or the deadline, whichever comes first, the whole group gets SIGTERM and 10 s later SIGKILL,
# so no worker of a step outlives it on the GPU. Everything printed goes to OUT_DIR/gpu_check.log
# (a device run brings back at most 8 files: this log, the loader's 3 and the step rows' 4).
#
# Preparing WHEEL_DIR, on a machine with network (x86_64; match the GPU machine's Python):
#   P="--only-binary=:all: --no-deps --python-version 3.12 --implementation cp -d .whl
#      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#   # the benchmarks: common.py needs psutil; plots matplotlib (skipped without it); the config pyyaml
#   pip download $P psutil pyyaml matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six
#   # the GPU tests
#   pip download $P pytest pluggy iniconfig pytest-timeout
#   # the engine and the loader (pixelbert_dist)
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
BUDGET=${GPU_CHECK_BUDGET_S:-450}
DEADLINE=$(( $(date +%s) + BUDGET ))
OUT=$(mkdir -p "$1" && cd "$1" && pwd)              # both resolved from the caller's directory
WHEELS=$(cd "${2:-.whl}" 2>/dev/null && pwd || echo "${2:-.whl}")
cd "$(dirname "$0")/.."
REPO=$(pwd)
SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX") || { echo "mktemp -d failed" >&2; exit 1; }
PY=${PYTHON:-python}
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
status=0
SUMMARY=()
GROUP=""   # the process group of the step running now

cleanup() {
    [[ -n "$GROUP" ]] && kill -KILL -- "-$GROUP" 2>/dev/null
    rm -rf "$SITE"
}
trap cleanup EXIT
trap 'echo "gpu_check: interrupted"; exit 130' INT TERM

# run_step NAME LIMIT_S COMMAND...: COMMAND in its own process group, ended (TERM, then KILL
# 10 s later) at LIMIT_S or at the deadline, whichever is first. Its result goes to the summary.
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$(( DEADLINE - $(date +%s) - 15 ))   # 15 s kept for the group's end and the summary
    (( limit > left )) && limit=$left
    echo
    echo "=== $(date -u +%H:%M:%S) $name (limit ${limit} s)"
    if (( limit < 5 )); then
        echo "skipped: the deadline has come"
        SUMMARY+=("| $name | skipped: deadline | 0 |")
        status=1
        return
    fi
    local began=$SECONDS
    # a new session (not a group leader here, so setsid does not fork): its pid is the group that
    # every child inherits. bash -c runs the step's function (exported) or command.
    setsid bash -c '"$@"' "$name" "$@" &
    GROUP=$!
    (
        trap 'kill $timer 2>/dev/null; exit 0' TERM
        sleep "$limit" >/dev/null 2>&1 & timer=$!; wait $timer
        echo "=== $name: limit of ${limit} s reached: SIGTERM to its process group"
        kill -TERM -- "-$GROUP" 2>/dev/null
        sleep 10 >/dev/null 2>&1 & timer=$!; wait $timer
        kill -KILL -- "-$GROUP" 2>/dev/null
    ) &
    local watchdog=$!
    wait "$GROUP"
    local rc=$?
    kill -TERM "$watchdog" 2>/dev/null
    wait "$watchdog" 2>/dev/null
    kill -KILL -- "-$GROUP" 2>/dev/null   # a child that outlived its parent goes too
    GROUP=""
    local spent=$(( SECONDS - began )) verdict="ok"
    if (( rc != 0 )); then
        verdict="failed (rc $rc)"
        (( rc == 143 || rc == 137 )) && verdict="ended at its limit (rc $rc)"
        status=1
    fi
    echo "=== $name: $verdict after ${spent} s"
    SUMMARY+=("| $name | $verdict | $spent |")
}

machine() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
        || echo "nvidia-smi: not found"
    $PY -c "import sys, torch, torchvision; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| torchvision', torchvision.__version__, '| cuda', torch.cuda.is_available())"
}

install_wheels() {
    compgen -G "$WHEELS/*.whl" > /dev/null || { echo "no wheels in $WHEELS: using what the machine has"; return 0; }
    # the wheels whose project is not installed yet (wheel names use '_' where projects use '-')
    local missing
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
    [[ ${#missing[@]} -eq 0 ]] || $PY -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "${missing[@]}"
}

gpu_tests() {
    # only the files that hold gpu tests: collecting the whole suite imports Ray, moto and MLflow
    local files
    mapfile -t files < <(grep -rl --include='test_*.py' 'pytest.mark.gpu' tests | sort)
    $PY -m pytest -m gpu -rA -q -p no:cacheprovider "${files[@]}"
}

export PY WHEELS SITE
export -f machine install_wheels gpu_tests
echo "gpu_check: budget ${BUDGET} s, deadline $(date -u -d "@$DEADLINE" +%H:%M:%S 2>/dev/null || echo "+${BUDGET} s")"
run_step "machine" 30 machine
run_step "install wheels from $WHEELS into $SITE" 90 install_wheels
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import nvidia.dali as d; print('nvidia.dali', d.__version__)" 2>/dev/null \
    || echo "nvidia.dali is not importable: the DALI rows will read 'not measured'; nvJPEG rows still run"
run_step "GPU tests (pytest -m gpu)" 150 gpu_tests
run_step "loader decode (bench_loader.py)" 75 $PY benchmarks/bench_loader.py --num-images 64 --out "$OUT"
run_step "step levers at 800x1333 bf16 (bench_step.py --gpu)" 600 $PY benchmarks/bench_step.py --gpu \
    --rows today,zero2-today,today-mb32,all,zero2-all,all-mb32 --more-micro-batches 32 --checkpoint-batches "" \
    --batches 2 --out "$OUT"

echo
echo "=== $(date -u +%H:%M:%S) summary (status $status; budget ${BUDGET} s, $(( BUDGET - DEADLINE + $(date +%s) )) s used)"
echo "| step | result | seconds |"
echo "|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
echo
echo "GPU tests:"
grep -E '^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) ' "$LOG" | sed 's/^/  /' || echo "  none ran"
echo "step rows measured (each appended as it was measured):"
for rows in "$OUT"/step_*.rows.jsonl; do
    [[ -f "$rows" ]] || { echo "  none"; break; }
    $PY - "$rows" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "error" in r:
        print(f"  {r['name']}: error: {r['error'].strip().splitlines()[-1][:200]}")
    else:
        print(f"  {r['name']} (micro batch {r['micro_batch']}): {r['step_s_round']:.3f} s/step, "
              f"{r['micro_batch'] / r['step_s_round']:.1f} pairs/s, peak {r.get('memory_peak_gib', float('nan')):.1f} GiB")
EOF
done
echo "GPU processes left: $(nvidia-smi --query-compute-apps=pid,process_name --format=csv,noheader 2>/dev/null | tr '\n' ' ' || true)"
echo "files in $OUT:"
ls -l "$OUT"
exit $status
