#!/usr/bin/env bash
# Session 13's single-GPU calls (one H200). Results are appended to $OUT/results.tar after each step, so a run cut
# short keeps what finished.
# `sweep`: braze's decode GEMM kernel (braze/codegen/decode_mm.py) against torch.mm per bench weight shape at
# T=1/2/4 (tile grid), then DeepSeek V3.2's step at T=1: stock Inductor, braze (GEMM merging on at T=1), braze
# without merging, braze with dual-stream (issue 7's two levers on the H200).
# `decode`: the decode-GEMM pass (FusionConfig.decode_gemm): its GPU tests and the merge GPU test, DeepSeek V3.2's
# prologue at T=1/2/4 (stock, braze, braze with every GEMM on cuBLAS), then DeepSeek's step at T=1 (stock, braze,
# braze-no-decode-gemm, braze-no-merge).
# `steps`: Qwen 3.5 and MiniMax-M2.5 at T=1 and 4 (stock, braze, braze-no-decode-gemm).
# `prologue`: DeepSeek V3.2's prologue at T=1/2/4 with L2 flushed before every replay (and back to back).
# `verify`: the GPU tests of the passes around it (dual-stream, chains, Qwen 3.5 tiny) and DeepSeek V3.2's bench
# report at T=1 on the GPU (decode-GEMM and independent-branch remarks).
# Usage: BRAZE_COMMIT=<sha> bash benchmarks/gpu_s13.sh sweep|decode|steps|prologue|verify
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
  decode)
    timeout 150 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs -m gpu \
      tests/codegen/test_decode_mm_kernel.py tests/passes/test_gemm_merge_gpu.py 2>&1 \
      | tee "$OUT/tests.log" | grep -v Warn | tail -5
    echo "tests: $((SECONDS - t0)) s"
    PYTHONPATH=$PWD:$PWD/benchmarks timeout 170 python3 benchmarks/deepseek_prologue.py --tokens 1,2,4 \
      --variants inductor,braze,braze-no-decode-gemm --out "$OUT/results" 2>&1 | tee "$OUT/prologue.log" \
      | grep "^T="
    echo "prologue: $((SECONDS - t0)) s"; keep
    timeout 170 python3 -m braze bench --model deepseek-v3.2 --size bench --tokens 1 --shapes static \
      --variants inductor,braze,braze-no-decode-gemm,braze-no-merge --budget-s 160 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench_ds.log" | grep -v Warn | grep "deepseek\|done"
    echo "deepseek: $((SECONDS - t0)) s"; keep
    ;;
  prologue)
    PYTHONPATH=$PWD:$PWD/benchmarks timeout 250 python3 benchmarks/deepseek_prologue.py --tokens 1,2,4 \
      --variants inductor,braze,braze-no-decode-gemm --out "$OUT/results" 2>&1 | tee "$OUT/prologue.log" \
      | grep "^T=\|Error"
    echo "prologue: $((SECONDS - t0)) s"; keep
    ;;
  verify)
    timeout 260 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs -m gpu tests/passes/test_streams_gpu.py \
      tests/passes/test_chain_gpu.py tests/passes/test_post_conv_gpu.py 2>&1 | tee "$OUT/tests.log" \
      | grep -v Warn | tail -5
    echo "tests: $((SECONDS - t0)) s"
    timeout 150 python3 -m braze report --model deepseek-v3.2 --size bench --tokens 1 --device cuda \
      --json "$OUT/results/deepseek_report_t1.json" > "$OUT/results/deepseek_report_t1.txt" 2>&1
    grep -c "decode-gemm\|cublas-faster" "$OUT/results/deepseek_report_t1.txt"
    grep "independent-branches" "$OUT/results/deepseek_report_t1.txt" | cut -c1-230 | head -24
    echo "report: $((SECONDS - t0)) s"; keep
    ;;
  steps)
    for m in qwen3.5 minimax-m2.5; do
      timeout 250 python3 -m braze bench --model $m --size bench --tokens 1,4 --shapes static \
        --variants inductor,braze,braze-no-decode-gemm --budget-s 240 --out "$OUT/results" 2>&1 \
        | tee "$OUT/bench_$m.log" | grep -v Warn | grep "$m\|done"
      echo "$m: $((SECONDS - t0)) s"; keep
    done
    ;;
esac
rmdir "$OUT/results" 2>/dev/null; true
