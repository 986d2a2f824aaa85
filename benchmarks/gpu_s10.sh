#!/usr/bin/env bash
# Session 10's single-GPU calls (the lent card is now an H200). `base`: the GEMM-merge and top-k GPU tests, the
# three models' steps at T=1/8/64 (stock Inductor vs braze), Qwen 3.5's report with stock Inductor's kernels per
# layer counted. Results are appended to $OUT/results.tar after each step, so a run cut short keeps what finished.
# `fused`: after the router fusion and the arange(T) state rows, the GPU tests of the router kernel, the GDN ops
# and the merge (routers sharpened), then the same steps and report as `base`.
# `final`: the router and merge GPU tests (the merge test did not finish inside `fused`'s 160 s), Qwen 3.5's report,
# Qwen 3.5 and MiniMax-M2.5 at T=1/8/64, then DeepSeek V3.2 at T=1 with and without sibling-GEMM merging.
# `shared`: the shared expert in the MoE kernels: its CUDA test, the merge test's new buffer bound, Qwen 3.5 at T=1.
# Usage: BRAZE_COMMIT=<sha> bash benchmarks/gpu_s10.sh base|fused|final|shared
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
keep() { tar -C "$OUT" -rf "$OUT/results.tar" results && rm -rf "$OUT/results" && mkdir -p "$OUT/results"; }
case ${1:-base} in
  base|fused)
    if [ "${1:-base}" = base ]; then TESTS="tests/passes/test_gemm_merge_gpu.py tests/codegen/test_topk_kernel.py"
    else TESTS="tests/passes/test_router.py tests/passes/test_post_conv_gpu.py tests/passes/test_gemm_merge_gpu.py"; fi
    timeout 160 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs -m gpu $TESTS 2>&1 \
      | tee "$OUT/tests.log" | tail -4
    echo "tests: $((SECONDS - t0)) s"; keep
    timeout 50 python3 -m braze report --model qwen3.5 --size bench --tokens 1 --device cuda \
      --json "$OUT/results/qwen3.5_report_t1.json" > "$OUT/results/qwen3.5_report_t1.txt" 2>&1
    tail -3 "$OUT/results/qwen3.5_report_t1.txt"; echo "report: $((SECONDS - t0)) s"; keep
    timeout 190 python3 -m braze bench --model deepseek-v3.2 --size bench --tokens 1,8,64 --shapes static \
      --variants inductor,braze --budget-s 175 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench_ds.log" | grep -v Warn | grep "deepseek\|report\|done"
    echo "deepseek: $((SECONDS - t0)) s"; keep
    timeout 190 python3 -m braze bench --model qwen3.5,minimax-m2.5 --size bench --tokens 1,8,64 --shapes static \
      --variants inductor,braze --budget-s 180 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench.log" | grep -v Warn | grep "qwen\|minimax\|report\|done"
    echo "steps: $((SECONDS - t0)) s"; keep
    ;;
  final)
    timeout 200 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs -m gpu tests/passes/test_router.py \
      tests/passes/test_gemm_merge_gpu.py 2>&1 | tee "$OUT/tests.log" | grep -v Warn | tail -12
    echo "tests: $((SECONDS - t0)) s"
    timeout 50 python3 -m braze report --model qwen3.5 --size bench --tokens 1 --device cuda \
      --json "$OUT/results/qwen3.5_report_t1.json" > "$OUT/results/qwen3.5_report_t1.txt" 2>&1
    grep -A7 "^layer" "$OUT/results/qwen3.5_report_t1.txt"; echo "report: $((SECONDS - t0)) s"; keep
    timeout 180 python3 -m braze bench --model qwen3.5,minimax-m2.5 --size bench --tokens 1,8,64 --shapes static \
      --variants inductor,braze --budget-s 170 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench.log" | grep -v Warn | grep "qwen\|minimax\|report\|done"
    echo "steps: $((SECONDS - t0)) s"; keep
    timeout 100 python3 -m braze bench --model deepseek-v3.2 --size bench --tokens 1 --shapes static \
      --variants inductor,braze,braze-no-merge --budget-s 90 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench_ds.log" | grep -v Warn | grep "deepseek\|report\|done"
    echo "deepseek: $((SECONDS - t0)) s"; keep
    ;;
  shared)
    timeout 110 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs -m gpu tests/passes/test_moe.py \
      tests/passes/test_gemm_merge_gpu.py 2>&1 | tee "$OUT/tests.log" | grep -v Warn | tail -6
    echo "tests: $((SECONDS - t0)) s"
    timeout 60 python3 -m braze bench --model qwen3.5 --size bench --tokens 1 --shapes static \
      --variants inductor,braze --budget-s 55 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench.log" | grep -v Warn | grep "qwen\|report\|done"
    echo "steps: $((SECONDS - t0)) s"; keep
    ;;
esac
rmdir "$OUT/results" 2>/dev/null; true
