#!/usr/bin/env bash
# Session 11's single-GPU calls (one H200). Results are appended to $OUT/results.tar after each step, so a run cut
# short keeps what finished.
# `verify`: the GPU tests of code session 10 changed after its last GPU run (the router's group-limited path, the
# shared expert's rounding and strides) with the router, MoE, GDN and GEMM-merge GPU tests.
# Usage: BRAZE_COMMIT=<sha> bash benchmarks/gpu_s11.sh verify
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
keep() { tar -C "$OUT" -rf "$OUT/results.tar" results && rm -rf "$OUT/results" && mkdir -p "$OUT/results"; }
case ${1:-verify} in
  verify)
    timeout 300 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs -m gpu tests/passes/test_router.py \
      tests/passes/test_moe.py tests/passes/test_post_conv_gpu.py tests/passes/test_gemm_merge_gpu.py 2>&1 \
      | tee "$OUT/tests.log" | grep -v Warn | tail -12
    echo "tests: $((SECONDS - t0)) s"
    ;;
esac
rmdir "$OUT/results" 2>/dev/null; true
