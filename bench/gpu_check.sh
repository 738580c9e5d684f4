#!/usr/bin/env bash
# One-shot CUDA check of the fast decode loop, sized for ~8 minutes on one H100/H200.
#   1. correctness: fp32 logits/greedy parity with transformers, fp16 finite + agreement (gpu_check.py)
#   2. speed: a 90 s track (3 windows), batch 1 and 4, stock vs fast side by side (bench.py)
# Results: bench/results/cuda_check.json and bench/results/cuda.json (copied to $OUT when set).
# Usage (repo root): PYTHON=.venv/bin/python bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p bench/results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

echo "== correctness (fp32 parity, fp16 agreement)"
timeout 180 "$PY" bench/gpu_check.py | tee bench/results/cuda_check.json
status=${PIPESTATUS[0]}

echo "== speed: 90 s, batch 1 and 4, stock vs fast (fp16)"
timeout 330 "$PY" bench/bench.py --device cuda --durations 90 --batches 1,4 --reps 1 \
    --impls stock,fast --json bench/results/cuda.json

if [ -n "${OUT:-}" ]; then cp bench/results/cuda*.json "$OUT"/; fi
exit "$status"
