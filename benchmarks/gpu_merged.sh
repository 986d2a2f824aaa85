#!/usr/bin/env bash
# One GPU call after merging the session's branches (device time is scarce): the single-GPU tests (the
# dual-stream and gemm-merge tests each in their own process), the DeepSeek V3.2 attention prologue, and
# decode steps of DeepSeek V3.2 and Qwen 3.5 against stock Inductor. Each step under its own timeout (the
# tests need about 300 s and the gemm-merge pair 120 s: the 150 s and 60 s of the first run cut them); logs
# and results under $OUT. Usage (repo root on the GPU machine): BRAZE_COMMIT=<sha> bash benchmarks/gpu_merged.sh
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:logging -p no:cacheprovider -rs -m gpu --ignore=tests/passes/test_collective_gpu.py \
  --ignore=tests/passes/test_streams_gpu.py --ignore=tests/passes/test_gemm_merge_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -12
echo "tests: $((SECONDS - t0)) s"
timeout 120 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs -s tests/passes/test_gemm_merge_gpu.py 2>&1 \
  | tee "$OUT/gemm_merge_gpu.log" | grep -v Warn | tail -12
timeout 50 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs tests/passes/test_streams_gpu.py 2>&1 \
  | tee "$OUT/streams_gpu.log" | tail -6
echo "all tests: $((SECONDS - t0)) s"
timeout 110 python3 benchmarks/deepseek_prologue.py --tokens 1,8,64 --variants eager,inductor,braze,braze-merge \
  --out "$OUT/results" 2>&1 | tee "$OUT/prologue.log" | grep -v Warn | tail -20
echo "prologue: $((SECONDS - t0)) s"
timeout "${BENCH_TIMEOUT:-150}" python3 -m braze bench --model deepseek-v3.2,qwen3.5 --size bench --tokens 1 --shapes static \
  --variants inductor,braze --budget-s 140 --out "$OUT/results" 2>&1 | tee "$OUT/bench.log" | grep -v Warn | tail -25
echo "total: $((SECONDS - t0)) s"
tar -C "$OUT" -cf "$OUT/results.tar" results && rm -rf "$OUT/results"  # one file back: a call returns at most 8
