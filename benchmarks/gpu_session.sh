#!/usr/bin/env bash
# One GPU session's runs, batched (device time is scarce): the GPU-marked tests, the TP=1 decode
# benchmark of the bench configs in bf16, and the same steps in fp32 as a correctness check (no
# bf16 rounding near a router tie there, so compiled must equal eager to ~1e-6).
# Usage (repo root, on the GPU machine): BRAZE_COMMIT=<sha> bash benchmarks/gpu_session.sh [tests|bench|fp32|all] [models]
# (BRAZE_COMMIT: the commit the copied tree holds; its git metadata there may be stale.)
# Results land under $OUT (default ./gpu_out): env.txt, logs, results.tar (JSON, markdown, PNG).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/results"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
what=${1:-all}
models=${2:-all}
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch, triton, sys; print("torch", torch.__version__, "triton", triton.__version__, "python", sys.version.split()[0])'
} | tee "$OUT/env.txt"
if [[ $what == tests || $what == all ]]; then
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:logging -rs -m gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi
if [[ $what == bench || $what == all ]]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 -m braze bench --model "$models" --size bench --tokens 1,8,64 \
    --budget-s "${BENCH_BUDGET:-250}" --out "$OUT/results" 2>&1 | tee "$OUT/bench.log" | grep -v Warn | tail -40
fi
if [[ $what == fp32 || $what == all ]]; then
  timeout "${FP32_TIMEOUT:-150}" python3 -m braze bench --model "$models" --size bench --tokens 1,8 --dtype float32 \
    --variants inductor,braze --replays 5 --budget-s "${FP32_BUDGET:-110}" --out "$OUT/results" 2>&1 \
    | tee "$OUT/bench_fp32.log" | grep -v Warn | tail -25
fi
tar -C "$OUT" -cf "$OUT/results.tar" results && rm -rf "$OUT/results"
