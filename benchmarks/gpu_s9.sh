#!/usr/bin/env bash
# Session 9's single-GPU calls. `topk`: the top-k GPU tests (both kernels), the selections alone with the rank
# kernel's block sweep (benchmarks/topk.py), then DeepSeek V3.2's decode step at T=1/8/64, stock Inductor vs
# braze. `steps`: DeepSeek's step at T=1/8 and its attention prologue at T=1-8, each with and without sibling-GEMM
# merging, then Qwen 3.5 and MiniMax-M2.5 steps at T=1, stock Inductor vs braze (after the top-k kernel's GPU
# tests). `final`: the GEMM-merge GPU test, then the three models' steps at T=1/8/64 with merging on by default.
# Usage: BRAZE_COMMIT=<sha> bash benchmarks/gpu_s9.sh topk|steps|final
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
case ${1:-topk} in
  topk)
    timeout 150 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs tests/codegen/test_topk_kernel.py \
      tests/passes/test_topk.py 2>&1 | tee "$OUT/tests.log" | tail -6
    echo "tests: $((SECONDS - t0)) s"
    timeout 200 python3 benchmarks/topk.py --tokens 1,8,64,256 --sweep --out "$OUT/results" 2>&1 \
      | tee "$OUT/topk.log" | grep -v Warn | tail -50
    echo "topk: $((SECONDS - t0)) s"
    timeout 330 python3 -m braze bench --model deepseek-v3.2 --size bench --tokens "${TOKENS:-1,8,64}" --shapes static \
      --variants inductor,braze --budget-s "${BUDGET:-300}" --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench.log" | grep -v Warn | tail -16
    echo "steps: $((SECONDS - t0)) s" ;;
  steps)
    timeout 80 python3 -m pytest -q -p no:logging -p no:cacheprovider tests/codegen/test_topk_kernel.py 2>&1 \
      | tee "$OUT/tests.log" | tail -2
    timeout 190 python3 -m braze bench --model deepseek-v3.2 --size bench --tokens "${DS_TOKENS:-1,8}" --shapes static \
      --variants inductor,braze,braze-merge --budget-s 175 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench_ds.log" | grep -v Warn | grep "deepseek\|report\|done"
    echo "deepseek: $((SECONDS - t0)) s"
    timeout 120 python3 benchmarks/deepseek_prologue.py --tokens 1,2,4,8 --variants inductor,braze,braze-merge \
      --out "$OUT/results" 2>&1 | tee "$OUT/prologue.log" | grep -v Warn | tail -14
    echo "prologue: $((SECONDS - t0)) s"
    timeout 170 python3 -m braze bench --model qwen3.5,minimax-m2.5 --size bench --tokens "${TOKENS:-1}" \
      --shapes static --variants inductor,braze --budget-s 150 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench.log" | grep -v Warn | grep "qwen\|minimax\|report\|done"
    echo "steps: $((SECONDS - t0)) s" ;;
  final)
    timeout 90 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs tests/passes/test_gemm_merge_gpu.py 2>&1 \
      | tee "$OUT/tests.log" | tail -3
    echo "tests: $((SECONDS - t0)) s"
    timeout 215 python3 -m braze bench --model deepseek-v3.2 --size bench --tokens 1,8,64 --shapes static \
      --variants inductor,braze --budget-s 200 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench_ds.log" | grep -v Warn | grep "deepseek\|report\|done"
    echo "deepseek: $((SECONDS - t0)) s"
    timeout 265 python3 -m braze bench --model qwen3.5,minimax-m2.5 --size bench --tokens 1,8,64 --shapes static \
      --variants inductor,braze --budget-s 240 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench.log" | grep -v Warn | grep "qwen\|minimax\|report\|done"
    echo "steps: $((SECONDS - t0)) s" ;;
esac
tar -C "$OUT" -cf "$OUT/results.tar" results && rm -rf "$OUT/results"
