#!/usr/bin/env bash
# One borrowed-GPU session, end to end, within a fixed wall-clock budget (default 660 s, under
# 12 minutes): every stage has its own timeout and writes its raw output into $OUT at once, so
# a stage cut short loses only itself.
#   1. the machine: nvidia-smi, torch and CUDA versions       -> $OUT/machine.txt
#   2. CUDA checks (tests/test_cuda.py, checks a-j)           -> $OUT/cuda_check.json, .log
#   3. GPU speed: benchmarks/speed.py --device cuda (20,480 captions at 8 per image, busy
#      fraction, matmul peak fractions, 8,192 uncached 640x480 JPEGs)  -> $OUT/speed-cuda.json
#   4. host cost per row: benchmarks/host.py (CPU only)      -> $OUT/host.json
#   5. optional (TRAIN=1): demo pre-training (benchmarks/demo_pretraining.py), three variants
#      sharing the GPU until the budget is spent               -> $OUT/train.log, <variant>.*
#
# Usage: OUT=/some/dir bash benchmarks/gpu_session.sh
#        OUT=/some/dir BUDGET_S=600 CHECKS_S=200 SPEED_S=300 HOST_S=90 bash benchmarks/gpu_session.sh
# Wiring check on a CPU (small sizes): DEVICE=cpu QUICK=1 OUT=/tmp/s bash benchmarks/gpu_session.sh
# Needs python3 with torch (on a GPU machine its CUDA build, as installed there: this script
# installs no torch); the package runs from this checkout's src (PYTHONPATH). Extra wheels
# (e.g. ftfy) may be placed in .whl/ and are installed without an index.
set -u
start=$(date +%s)
OUT=${OUT:-/tmp/gpu-session}
BUDGET_S=${BUDGET_S:-660}
CHECKS_S=${CHECKS_S:-210} SPEED_S=${SPEED_S:-300} HOST_S=${HOST_S:-100}
DEVICE=${DEVICE:-cuda} QUICK=${QUICK:-0} TRAIN=${TRAIN:-0}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
# timeout of a stage: its own limit, or what is left of the budget if that is less
limit() { local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }
stage() {  # stage NAME SECONDS COMMAND... : run it under its timeout, log to $OUT/NAME.log
    local name=$1 seconds; seconds=$(limit "$2"); shift 2
    if [ "$seconds" -lt 20 ]; then echo "$name: skipped, ${seconds} s left"; return; fi
    timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? (limit ${seconds} s) after $(( $(date +%s) - start )) s"
}

{
    date -u
    nvidia-smi -L 2>&1
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
        --format=csv 2>&1
    echo "cpus: $(nproc) usable of $(getconf _NPROCESSORS_ONLN)"
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())"
    git log -1 --format='commit %H %s' 2>/dev/null
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "$QUICK" = 1 ]; then
    SPEED_ARGS=(--size tiny --captions 64 --jpeg-images 16 --rounds 1 --peak-trials 1
                --peak-size 256)
    HOST_ARGS=(--rows 2000 --workers 0 1)
    CHECK_ONLY=(--only a,h,j)
else
    SPEED_ARGS=(--captions 20480 --per-image 8 --jpeg-images 8192)
    HOST_ARGS=(--rows 30000 --workers 1 4 8)
    CHECK_ONLY=()
fi

# The checks rewrite cuda_check.json as they go: what finished survives a timeout.
stage cuda_check "$CHECKS_S" python3 tests/test_cuda.py --out "$OUT" --device "$DEVICE" \
    --timeout 120 "${CHECK_ONLY[@]}"
stage speed "$SPEED_S" python3 benchmarks/speed.py --device "$DEVICE" "${SPEED_ARGS[@]}" \
    --stream-rows 0 --stream-full-rows 0 --json "$OUT/speed-cuda.json"
stage host "$HOST_S" python3 benchmarks/host.py "${HOST_ARGS[@]}" --json "$OUT/host.json"
tail -n 3 "$OUT"/*.log

if [ "$TRAIN" = 1 ] && [ "$(left)" -gt 120 ]; then
    SHARDS=${SHARDS:-16} SCENES=${SCENES:-6250} BATCH=${BATCH:-512}
    stage prepare "$(left)" python3 benchmarks/demo_pretraining.py prepare --out /tmp/demo \
        --scenes-per-shard "$SCENES" --shards "$SHARDS" --workers 10
    PARSE_STEPS=${PARSE_STEPS:-5000} STEPS=${STEPS:-4700}
    echo "training ${PARSE_STEPS} + ${STEPS} steps per variant (cut at the budget)"
    for v in q qi wide; do
        timeout "$(left)" python3 benchmarks/demo_pretraining.py train --data /tmp/demo/world.pt \
            --variant "$v" --parse-steps "$PARSE_STEPS" --steps "$STEPS" --batch "$BATCH" \
            --eval-every 1000 --device "$DEVICE" --save "$OUT/$v.safetensors" \
            >> "$OUT/train.log" 2>&1 &
    done
    wait
    grep -E "final|parse step|Error|error" "$OUT/train.log" | tail -n 20
fi
echo "done after $(( $(date +%s) - start )) s"
