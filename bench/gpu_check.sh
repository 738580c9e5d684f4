#!/usr/bin/env bash
# One-shot CUDA check, sized for ≤ 8 minutes on one H100/H200-class GPU:
#   1. correctness: `pytest -m gpu` (tests/test_gpu.py: parity per dtype, graph replay, fallback
#      ladder, NaN stop, EnCodec decode on CUDA), ≤ GPU_TESTS_S seconds
#   2. speed: a 90 s track (full-size random weights), 1 and 4 takes, stock vs fast (bench/bench.py),
#      ≤ BENCH_S seconds
# Part 2 runs even when part 1 fails or times out; each part's log comes back either way.
# Results go to $OUT when set, else bench/results/gpu-check/: nvidia-smi.txt, gpu_tests.log,
# gpu_tests.xml (JUnit), gpu_report.jsonl (measured figures), bench.log, cuda.json, status.txt.
# Exit status: 0 when both parts passed, else 1.
#
# Usage (repo root):  PYTHON=.venv/bin/python bash bench/gpu_check.sh
#                     bash bench/gpu_check.sh --smoke   # no GPU needed: checks the script starts, the gpu
#                                                       # tests skip cleanly, and the bench parses its flags
set -uo pipefail  # no -e: a failing part must not stop the next one; statuses are collected below

cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DEST="${OUT:-bench/results/gpu-check}"
GPU_TESTS_S="${GPU_TESTS_S:-240}"   # seconds; the suite targets ≤ 5 min on one H100
BENCH_S="${BENCH_S:-220}"           # seconds; the 90 s stock runs dominate
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; fi
mkdir -p "$DEST"
export TYDUST_GPU_REPORT="$DEST/gpu_report.jsonl"
: > "$TYDUST_GPU_REPORT"

{ nvidia-smi --query-gpu=index,name,memory.total,driver_version,compute_cap --format=csv || echo "no nvidia-smi"; } \
    > "$DEST/nvidia-smi.txt" 2>&1
cat "$DEST/nvidia-smi.txt"

echo "== 1. pytest -m gpu (limit ${GPU_TESTS_S} s)"
timeout "$GPU_TESTS_S" "$PY" -m pytest -m gpu -rA -q -p no:cacheprovider \
    --junitxml "$DEST/gpu_tests.xml" > "$DEST/gpu_tests.log" 2>&1
tests_status=$?
tail -n 40 "$DEST/gpu_tests.log"
if [ "$tests_status" -eq 124 ]; then echo "gpu tests: TIMED OUT after ${GPU_TESTS_S} s"; fi

echo "== 2. speed: 90 s, 1 and 4 takes, stock vs fast (limit ${BENCH_S} s)"
if [ "$SMOKE" -eq 1 ]; then
    "$PY" bench/bench.py --help > "$DEST/bench.log" 2>&1
else
    timeout "$BENCH_S" "$PY" bench/bench.py --device cuda --durations 90 --batches 1,4 --reps 1 \
        --impls stock,fast --json "$DEST/cuda.json" > "$DEST/bench.log" 2>&1
fi
bench_status=$?
tail -n 40 "$DEST/bench.log"
if [ "$bench_status" -eq 124 ]; then echo "bench: TIMED OUT after ${BENCH_S} s"; fi

printf 'gpu_tests %s\nbench %s\n' "$tests_status" "$bench_status" | tee "$DEST/status.txt"
if [ "$tests_status" -ne 0 ] || [ "$bench_status" -ne 0 ]; then exit 1; fi
exit 0
