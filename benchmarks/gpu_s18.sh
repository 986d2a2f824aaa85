#!/usr/bin/env bash
# Session 18's single-GPU calls (one H200). Results are appended to $OUT/results.tar after each step.
# `verify`: session 17's review fixes (spec encoding, casts kept outside) on the GPU: the dual-stream and
# GEMM-merge GPU tests, the side branch's kernels, DeepSeek V3.2's MoE block and step at T=1 with and without
# dual-stream, now with each CUDA graph's timeline (busy / idle / overlapped time, bench_device.graph_timeline);
# MiniMax M2.5 at T=8 with stock Inductor beside braze (does stock miss the same router near-ties?).
# `default`: the three models' steps at T=1/8/64 with and without dual-stream, with timelines.
# Usage: BRAZE_COMMIT=<sha> [TOTAL_S=<s>] bash benchmarks/gpu_s18.sh verify|default
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
case ${1:-verify} in
  verify)
    gpu_tests 150 tests/passes/test_streams_gpu.py tests/passes/test_gemm_merge_gpu.py
    TORCH_LOGS=output_code timeout 60 python3 benchmarks/diag/branch_code.py --tokens 1 > "$OUT/branch_code.log" 2>&1
    grep "^==== branch\|\.run(\|extern_kernels\.\w*(" "$OUT/branch_code.log" | sed 's/.*output_code\] //' | cut -c1-110
    echo "diag: $((SECONDS - t0)) s"
    regions 100 deepseek-v3.2:1
    bench deepseek-v3.2 1 braze,braze-no-streams bench_ds.log
    bench minimax-m2.5 8 inductor,braze bench_mm.log
    ;;
  default)
    bench deepseek-v3.2 1,8,64 braze,braze-no-streams bench_ds.log
    bench qwen3.5 1,8,64 braze,braze-no-streams bench_qwen.log
    bench minimax-m2.5 1,8,64 braze,braze-no-streams bench_mm.log
    ;;
esac
# `priority`: the side stream at the device's highest priority (braze.runtime.streams.SIDE_PRIORITY) against the
# default: the MoE blocks alone (interleaved, each variant's kernel timeline kept) and DeepSeek V3.2's step at
# T=1, its variants in two orders (is one-after-the-other timing still biased with the 0.25 s warm-up?).
if [ "${1:-}" = priority ]; then
  REGIONS_ARGS=--side-high regions 150 deepseek-v3.2:1,8 qwen3.5:8 minimax-m2.5:8
  bench deepseek-v3.2 1 braze-no-streams,braze,braze-side-high bench_ds.log
  timeout $(($(left) - 10)) python3 -m braze bench --model deepseek-v3.2 --size bench --tokens 1 --shapes static \
    --variants braze-side-high,braze,braze-no-streams --budget-s $(($(left) - 40)) --out "$OUT/results/reversed" \
    2>&1 | tee "$OUT/bench_ds_reversed.log" | grep "deepseek\|done"
  echo "reversed: $((SECONDS - t0)) s"; keep
fi
# `pairing`: the shared expert beside the router + routed experts, paired by hand (benchmarks/diag/moe_pairing.py),
# against braze's block on one stream and with dual-stream as decided (router beside the shared expert).
if [ "${1:-}" = pairing ]; then
  for m in deepseek-v3.2 qwen3.5; do
    [ "$(left)" -gt 120 ] || break
    timeout $(($(left) - 5)) python3 benchmarks/diag/moe_pairing.py --model "$m" --tokens 1,8,64 \
      --out "$OUT/results/moe_pairing_$m.json" 2>&1 | tee -a "$OUT/pairing.log" | grep "T=\|Error"
    echo "pairing $m: $((SECONDS - t0)) s"; keep
  done
fi
# `pairs`: after the branch analysis learned pairings (a branch beside the rest of its region: the shared expert
# beside the router and the routed experts): the dual-stream and GEMM-merge GPU tests, the MoE blocks alone and
# the steps of DeepSeek V3.2 and Qwen 3.5 (MiniMax M2.5 has no shared expert: nothing changes there).
if [ "${1:-}" = pairs ]; then
  gpu_tests 170 tests/passes/test_streams_gpu.py tests/passes/test_gemm_merge_gpu.py
  regions 120 deepseek-v3.2:1,8,64 qwen3.5:1,8,64
  bench deepseek-v3.2 1,8 braze,braze-no-streams bench_ds.log
  bench qwen3.5 8,64 braze,braze-no-streams bench_qwen.log
fi
# `final`: after the pair's estimate covers only the two branches it outlines and pairings are offered for the
# largest branch only: the dual-stream GPU tests, the MoE blocks (DeepSeek V3.2 T=1/8/64, Qwen 3.5 T=8/64) and
# the steps of DeepSeek V3.2 (T=1/8) and Qwen 3.5 (T=8/64), with and without dual-stream.
if [ "${1:-}" = final ]; then
  gpu_tests 120 tests/passes/test_streams_gpu.py
  regions 100 deepseek-v3.2:1,8,64 qwen3.5:8,64
  bench deepseek-v3.2 1,8 braze,braze-no-streams bench_ds.log
  bench qwen3.5 8,64 braze,braze-no-streams bench_qwen.log
fi
