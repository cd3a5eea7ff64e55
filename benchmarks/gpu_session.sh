#!/usr/bin/env bash
# One borrowed-GPU session, end to end, within a fixed wall-clock budget:
#   1. CUDA checks (the test module tests/test_cuda.py) and the GPU speed benchmark, while the
#      demo pre-training data is generated on the CPU cores;
#   2. demo pre-training (benchmarks/demo_pretraining.py), three variants sharing the GPU.
# Writes into $OUT: checks.tar.gz (check and speed reports), train.log, and per variant
# <variant>.safetensors (fp16) and <variant>.json (intrinsic rates over time).
#
# Usage: OUT=/some/dir BUDGET_S=540 bash benchmarks/gpu_session.sh
# Wiring check on a CPU: DEVICE=cpu SHARDS=2 SCENES=100 IMAGES=2 BATCH=16 PARSE_STEPS=4 \
#   STEPS=4 BUDGET_S=240 ...
# Needs python3 with torch (CUDA); extra wheels (e.g. ftfy) may be placed in .whl/.
set -u
start=$(date +%s)
OUT=${OUT:-/tmp/gpu-session}
BUDGET_S=${BUDGET_S:-540}
DEVICE=${DEVICE:-cuda} SHARDS=${SHARDS:-16} SCENES=${SCENES:-6250} IMAGES=${IMAGES:-64}
BATCH=${BATCH:-512} PARSE_STEPS=${PARSE_STEPS:-5000} STEPS=${STEPS:-4700}
mkdir -p "$OUT" /tmp/checks
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"

python3 benchmarks/demo_pretraining.py prepare --out /tmp/demo --scenes-per-shard "$SCENES" \
    --shards "$SHARDS" --workers 10 > /tmp/checks/prepare.log 2>&1 &
prepare=$!
# The checks write /tmp/checks/cuda_check.json as they go; without pytest on the machine
# the module runs as a script (the same checks and report).
if python3 -c "import pytest" 2>/dev/null; then
    SPECS_CUDA_DEVICE="$DEVICE" SPECS_CUDA_REPORT=/tmp/checks timeout 150 \
        python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py \
        > /tmp/checks/cuda_check.log 2>&1
else
    timeout 150 python3 tests/test_cuda.py --out /tmp/checks --device "$DEVICE" \
        > /tmp/checks/cuda_check.log 2>&1
fi
echo "cuda checks rc=$? after $(( $(date +%s) - start )) s"
timeout 150 python3 benchmarks/speed.py --device "$DEVICE" --images "$IMAGES" --rounds 3 \
    --stream-rows 0 --stream-full-rows 0 --json /tmp/checks/speed-cuda.json \
    > /tmp/checks/speed.log 2>&1
echo "speed rc=$? after $(( $(date +%s) - start )) s"
wait $prepare
echo "prepare rc=$? after $(( $(date +%s) - start )) s"
tar czf "$OUT/checks.tar.gz" -C /tmp checks
tail -n 5 /tmp/checks/*.log

# Train the three variants side by side, each for a fixed number of steps (the steps the
# 5.4-minute runs reached on an H200); the timeout keeps the session within its budget.
echo "training ${PARSE_STEPS} + ${STEPS} steps per variant"
for v in q qi wide; do
    timeout "$(( BUDGET_S - ($(date +%s) - start) ))" \
        python3 benchmarks/demo_pretraining.py train --data /tmp/demo/world.pt --variant "$v" \
        --parse-steps "$PARSE_STEPS" --steps "$STEPS" --batch "$BATCH" --eval-every 1000 \
        --device "$DEVICE" --save "$OUT/$v.safetensors" >> "$OUT/train.log" 2>&1 &
done
wait
grep -E "final|parse step|Error|error" "$OUT/train.log" | tail -n 20
echo "done after $(( $(date +%s) - start )) s"
