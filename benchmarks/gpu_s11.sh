#!/usr/bin/env bash
# Session 11's single-GPU calls (one H200). Results are appended to $OUT/results.tar after each step, so a run cut
# short keeps what finished.
# `verify`: the GPU tests of code session 10 changed after its last GPU run (the router's group-limited path, the
# shared expert's rounding and strides) with the router, MoE, GDN and GEMM-merge GPU tests.
# `fold`: the gated RMSNorm inside the delta-rule kernel (FusionConfig.delta_rule_norm): the kernel's CUDA tests
# (CUDA params), Qwen 3.5's linear-attention mixer and layer alone (stock Inductor, braze, braze without the
# fold), then Qwen 3.5's step at T=1/8/64 with the same three variants and its report.
# `micro`: the gated kernel alone at 4, 8 and 16 warps against the two kernels it replaces.
# `steps4`: with the gated kernel at 4 warps, Qwen 3.5's linear-attention mixer and its step at T=1/8/64, braze with
# and without the fold.
# `prologue`: DeepSeek V3.2's attention prologue alone on the H200 (issue 4's floor target), T=1/8/64.
# `deepseek`: DeepSeek V3.2's step at T=1/8/64 with its group-limited router fused (never run on a GPU before).
# `shared`: DeepSeek V3.2 and Qwen 3.5 at T=1 with and without the shared expert in the MoE kernels.
# Usage: BRAZE_COMMIT=<sha> bash benchmarks/gpu_s11.sh verify|fold|micro|steps4|prologue|deepseek|shared
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
  fold)
    timeout 150 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs -m gpu tests/codegen/test_delta_rule_kernel.py \
      tests/passes/test_post_conv_gpu.py 2>&1 \
      | tee "$OUT/tests.log" | grep -v Warn | tail -6
    echo "tests: $((SECONDS - t0)) s"
    timeout 180 python3 benchmarks/qwen_layers.py --blocks linear-mixer,linear-layer --tokens 1,8,64 \
      --variants inductor,braze,braze-no-norm-fold --out "$OUT/results" 2>&1 | tee "$OUT/layers.log" \
      | grep "linear-"
    echo "layers: $((SECONDS - t0)) s"; keep
    timeout 50 python3 -m braze report --model qwen3.5 --size bench --tokens 1 --device cuda \
      --json "$OUT/results/qwen3.5_report_t1.json" > "$OUT/results/qwen3.5_report_t1.txt" 2>&1
    grep -A7 "^layer" "$OUT/results/qwen3.5_report_t1.txt"; echo "report: $((SECONDS - t0)) s"; keep
    timeout 200 python3 -m braze bench --model qwen3.5 --size bench --tokens 1,8,64 --shapes static \
      --variants inductor,braze,braze-no-norm-fold --budget-s 190 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench.log" | grep -v Warn | grep "qwen\|report\|done"
    echo "steps: $((SECONDS - t0)) s"; keep
    ;;
  micro)
    timeout 200 python3 benchmarks/delta_rule_norm.py --tokens 1,8,64,256 --out "$OUT/results" 2>&1 \
      | tee "$OUT/micro.log" | grep "^T="
    echo "micro: $((SECONDS - t0)) s"; keep
    ;;
  steps4)
    timeout 120 python3 benchmarks/qwen_layers.py --blocks linear-mixer --tokens 1,8,64 \
      --variants braze,braze-no-norm-fold --out "$OUT/results" 2>&1 | tee "$OUT/layers.log" | grep "^linear-"
    echo "layers: $((SECONDS - t0)) s"; keep
    timeout 200 python3 -m braze bench --model qwen3.5 --size bench --tokens 1,8,64 --shapes static \
      --variants inductor,braze,braze-no-norm-fold --budget-s 190 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench.log" | grep -v Warn | grep "qwen\|done"
    echo "steps: $((SECONDS - t0)) s"; keep
    ;;
  prologue)
    PYTHONPATH=$PWD:$PWD/benchmarks timeout 200 python3 benchmarks/deepseek_prologue.py --tokens 1,8,64 \
      --variants inductor,braze --out "$OUT/results" 2>&1 | tee "$OUT/prologue.log" | grep -v Warn | tail -12
    echo "prologue: $((SECONDS - t0)) s"; keep
    ;;
  deepseek)
    timeout 230 python3 -m braze bench --model deepseek-v3.2 --size bench --tokens 1,8,64 --shapes static \
      --variants inductor,braze --budget-s 215 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench_ds.log" | grep -v Warn | grep "deepseek\|report\|done"
    echo "deepseek: $((SECONDS - t0)) s"; keep
    ;;
  shared)
    timeout 110 python3 -m braze bench --model deepseek-v3.2 --size bench --tokens 1 --shapes static \
      --variants inductor,braze,braze-no-shared --budget-s 100 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench_ds.log" | grep -v Warn | grep "deepseek\|done"
    echo "deepseek: $((SECONDS - t0)) s"; keep
    timeout 60 python3 -m braze bench --model qwen3.5 --size bench --tokens 1 --shapes static \
      --variants braze,braze-no-shared --budget-s 50 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench.log" | grep -v Warn | grep "qwen\|done"
    echo "qwen: $((SECONDS - t0)) s"; keep
    ;;
esac
rmdir "$OUT/results" 2>/dev/null; true
