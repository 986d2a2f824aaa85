#!/usr/bin/env bash
# Session 13's single-GPU calls (one H200). Results are appended to $OUT/results.tar after each step, so a run cut
# short keeps what finished.
# `sweep`: braze's decode GEMM kernel (braze/codegen/decode_mm.py) against torch.mm per bench weight shape at
# T=1/2/4 (tile grid), then DeepSeek V3.2's step at T=1: stock Inductor, braze (GEMM merging on at T=1), braze
# without merging, braze with dual-stream (issue 7's two levers on the H200).
# Usage: BRAZE_COMMIT=<sha> bash benchmarks/gpu_s13.sh sweep
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
keep() { tar -C "$OUT" -rf "$OUT/results.tar" results && rm -rf "$OUT/results" && mkdir -p "$OUT/results"; }
case ${1:-sweep} in
  sweep)
    timeout 290 python3 benchmarks/decode_mm.py --tokens 1,2,4 --out "$OUT/results" 2>&1 \
      | tee "$OUT/sweep.log" | grep -v Warn | grep "^T=\|Error\|error"
    echo "sweep: $((SECONDS - t0)) s"; keep
    timeout 185 python3 -m braze bench --model deepseek-v3.2 --size bench --tokens 1 --shapes static \
      --variants inductor,braze,braze-no-merge,braze-streams --budget-s 175 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench_ds.log" | grep -v Warn | grep "deepseek\|done"
    echo "deepseek: $((SECONDS - t0)) s"; keep
    ;;
esac
rmdir "$OUT/results" 2>/dev/null; true
