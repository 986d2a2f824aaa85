#!/usr/bin/env bash
# Session 14's single-GPU calls (one H200). Results are appended to $OUT/results.tar after each step, so a run cut
# short keeps what finished.
# `prologue`: the GPU tests of the decode kernel with a folded RMSNorm, of the chain launches (DeepSeek V3.2 and
# Qwen 3.5 tiny) and of GEMM merging; then DeepSeek V3.2's prologue at T=1/2/4 with L2 flushed before every replay:
# stock Inductor, braze, braze without the norm in the GEMM (FusionConfig.decode_gemm_norm), braze with every
# GEMM on cuBLAS.
# `steps`: DeepSeek V3.2's step at T=1 and 64 (stock, braze): its attention chains in one launch per layer.
# `fold`: the decode kernel with the norm folded in against the unfused norm + GEMM (benchmarks/decode_mm_norm.py),
# then the prologue at T=1/2 (braze, braze-no-gemm-norm).
# `absorb`: with MLA's absorbed W_UK in the chain launch: the `prologue` tests, the prologue at T=1/2/4 (stock,
# braze, braze with every GEMM on cuBLAS), then DeepSeek's step at T=1 and 64 (stock, braze).
# `final`: the same with only the chain GPU tests (the kernels are unchanged since `absorb`).
# Usage: BRAZE_COMMIT=<sha> bash benchmarks/gpu_s14.sh prologue|fold|tiles|steps|absorb|final
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
keep() { tar -C "$OUT" -rf "$OUT/results.tar" results && rm -rf "$OUT/results" && mkdir -p "$OUT/results"; }
case ${1:-prologue} in
  prologue)
    timeout 200 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs -m gpu \
      tests/codegen/test_decode_mm_kernel.py tests/passes/test_chain_gpu.py tests/passes/test_gemm_merge_gpu.py 2>&1 \
      | tee "$OUT/tests.log" | grep -v Warn | tail -5
    echo "tests: $((SECONDS - t0)) s"
    PYTHONPATH=$PWD:$PWD/benchmarks timeout 330 python3 benchmarks/deepseek_prologue.py --tokens 1,2,4 \
      --variants inductor,braze,braze-no-gemm-norm,braze-no-decode-gemm --out "$OUT/results" 2>&1 \
      | tee "$OUT/prologue.log" | grep "^T=\|Error"
    echo "prologue: $((SECONDS - t0)) s"; keep
    ;;
  absorb|final)
    tests="tests/passes/test_chain_gpu.py"
    [ "$1" = absorb ] && tests="tests/codegen/test_decode_mm_kernel.py $tests tests/passes/test_gemm_merge_gpu.py"
    timeout 200 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs -m gpu $tests 2>&1 \
      | tee "$OUT/tests.log" | grep -v Warn | tail -5
    echo "tests: $((SECONDS - t0)) s"
    PYTHONPATH=$PWD:$PWD/benchmarks timeout 200 python3 benchmarks/deepseek_prologue.py --tokens 1,2,4 \
      --variants inductor,braze,braze-no-decode-gemm --out "$OUT/results" 2>&1 | tee "$OUT/prologue.log" \
      | grep "^T=\|Error"
    echo "prologue: $((SECONDS - t0)) s"; keep
    timeout 180 python3 -m braze bench --model deepseek-v3.2 --size bench --tokens 1,64 --shapes static \
      --variants inductor,braze --budget-s 170 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench_ds.log" | grep -v Warn | grep "deepseek\|done"
    echo "deepseek: $((SECONDS - t0)) s"; keep
    ;;
  fold)
    PYTHONPATH=$PWD:$PWD/benchmarks timeout 200 python3 benchmarks/decode_mm_norm.py --tokens 1,2,4 \
      --out "$OUT/results" 2>&1 | tee "$OUT/fold.log" | grep "^T=\|Error"
    echo "fold: $((SECONDS - t0)) s"; keep
    PYTHONPATH=$PWD:$PWD/benchmarks timeout 200 python3 benchmarks/deepseek_prologue.py --tokens 1,2 \
      --variants braze,braze-no-gemm-norm --out "$OUT/results" 2>&1 | tee "$OUT/prologue.log" | grep "^T=\|Error"
    echo "prologue: $((SECONDS - t0)) s"; keep
    ;;
  tiles)
    PYTHONPATH=$PWD:$PWD/benchmarks timeout 300 python3 benchmarks/decode_mm_norm.py --tokens 1,2 --tiles \
      --out "$OUT/results" 2>&1 | tee "$OUT/tiles.log" | grep "^T=\|Error"
    echo "tiles: $((SECONDS - t0)) s"; keep
    ;;
  steps)
    timeout 400 python3 -m braze bench --model deepseek-v3.2 --size bench --tokens 1,64 --shapes static \
      --variants inductor,braze --budget-s 390 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench_ds.log" | grep -v Warn | grep "deepseek\|done"
    echo "deepseek: $((SECONDS - t0)) s"; keep
    ;;
esac
rmdir "$OUT/results" 2>/dev/null; true
