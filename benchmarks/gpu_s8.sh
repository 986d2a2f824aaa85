#!/usr/bin/env bash
# Session 8's single-GPU calls. `topk`: the GPU kernel tests (small-topk, moe), the top-k selections alone
# (benchmarks/topk.py), then DeepSeek V3.2's decode step at T=1/8/64: stock Inductor, braze, braze without
# small-topk. `steps`: Qwen 3.5 and MiniMax-M2.5 the same way at T=1/8/64, then DeepSeek's attention prologue
# with and without sibling-GEMM merging at T=1-8. Usage: BRAZE_COMMIT=<sha> bash benchmarks/gpu_s8.sh topk|steps
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
case ${1:-topk} in
  topk)
    timeout 120 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs tests/codegen/test_topk_kernel.py \
      tests/codegen/test_moe_kernel.py tests/passes/test_topk.py 2>&1 | tee "$OUT/tests.log" | tail -6
    echo "tests: $((SECONDS - t0)) s"
    timeout 150 python3 benchmarks/topk.py --tokens 1,8,64 --out "$OUT/results" 2>&1 | tee "$OUT/topk.log" \
      | grep -v Warn | tail -40
    echo "topk: $((SECONDS - t0)) s"
    timeout 400 python3 -m braze bench --model deepseek-v3.2 --size bench --tokens "${TOKENS:-1,8,64}" --shapes static \
      --variants inductor,braze,braze-no-topk --budget-s "${BUDGET:-370}" --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench.log" | grep -v Warn | tail -16
    echo "steps: $((SECONDS - t0)) s" ;;
  steps)
    timeout 420 python3 -m braze bench --model qwen3.5,minimax-m2.5 --size bench --tokens "${TOKENS:-1,8,64}" \
      --shapes static --variants inductor,braze --budget-s "${BUDGET:-390}" --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench.log" | grep -v Warn | tail -16
    echo "steps: $((SECONDS - t0)) s"
    timeout 150 python3 benchmarks/deepseek_prologue.py --tokens 1,2,4,8 --variants inductor,braze,braze-merge \
      --out "$OUT/results" 2>&1 | tee "$OUT/prologue.log" | grep -v Warn | tail -14
    echo "prologue: $((SECONDS - t0)) s" ;;
esac
tar -C "$OUT" -cf "$OUT/results.tar" results && rm -rf "$OUT/results"
