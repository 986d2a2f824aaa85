#!/usr/bin/env bash
# Session 5's single-GPU call(s): `tests` = the GPU tests not yet run on the merged code (post-conv bf16, the
# demo backend, braze.ops on CUDA, dual-stream incl. the MoE case, gemm-merge incl. Qwen), each file under its
# own timeout; `bench` = decode steps of the three bench models vs stock Inductor (static shapes), whose
# results now carry device time per kernel kind. Usage: BRAZE_COMMIT=<sha> bash benchmarks/gpu_s5.sh tests|bench
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
PY="python3 -m pytest -q -p no:logging -p no:cacheprovider -rs"
if [[ ${1:-tests} == tests ]]; then
  timeout 150 $PY -m gpu tests/passes/test_post_conv_gpu.py tests/test_backend.py tests/test_ops.py 2>&1 | tee "$OUT/tests_a.log" | tail -8
  echo "a: $((SECONDS - t0)) s"
  timeout 70 $PY tests/passes/test_streams_gpu.py 2>&1 | tee "$OUT/streams_gpu.log" | tail -6
  echo "streams: $((SECONDS - t0)) s"
  timeout 200 $PY -s tests/passes/test_gemm_merge_gpu.py 2>&1 | tee "$OUT/gemm_merge_gpu.log" | grep -v Warn | tail -12
  echo "tests: $((SECONDS - t0)) s"
else
  timeout 560 python3 -m braze bench --model deepseek-v3.2,qwen3.5,minimax-m2.5 --size bench --tokens "${TOKENS:-1}" \
    --shapes static --variants inductor,braze --budget-s "${BUDGET:-480}" --out "$OUT/results" 2>&1 \
    | tee "$OUT/bench.log" | grep -v Warn | tail -30
  echo "bench: $((SECONDS - t0)) s"
  tar -C "$OUT" -cf "$OUT/results.tar" results && rm -rf "$OUT/results"
fi
